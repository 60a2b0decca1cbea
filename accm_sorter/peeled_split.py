"""Split sorted units on their peeled waveforms: each spike with every other matched spike subtracted.

In a crowded site a spike's window holds on average one or two other neurons' spikes, and those, not
the neuron's own shape, are what a unit's raw waveforms vary most by. Two faint neurons a few um apart
(dense-overlap seed 2002: GT 7 and GT 11, 2.6 and 2.9 noise levels, 7 um apart) that end in one unit
cannot be told apart on raw waveforms (k-means on their principal components cuts off collisions, not a
neuron: 2,205 + 1,673 against 78 + 42 spikes), while on peeled waveforms k-means parts them 2,009 + 172
against 274 + 1,543. The cut is kept on the trains' evidence only, as the other splits after matching:
one neuron's parts never meet in the refractory period, two neurons' do (refractory ratio of the cut
0.53 there; 0.02-0.22 for the cuts of eight single-neuron units of the same recording).
"""

from __future__ import annotations

import numpy as np

# principal components of a unit's peeled waveforms that k-means cuts in two (the cut of the two
# neurons above is the same within 20 spikes on 4, 10, 24 components or the whole waveform)
PEELED_SPLIT_PCA_COMPONENTS = 10
# peeled waveforms per unit on which the cut is found; every spike of the unit is then classified
PEELED_SPLIT_SAMPLE = 1000
# the parts of a kept cut are refined by a two-part mixture fitted to at most this many of the unit's spikes, for at
# most this many rounds or until no spike's posterior moves by the tolerance (dense-overlap 2002's two faint neurons,
# all 4,305 spikes: the wrong-part count settles within 30 rounds)
PEELED_SPLIT_EM_SAMPLE = 5000
PEELED_SPLIT_EM_ROUNDS = 60
PEELED_SPLIT_EM_TOLERANCE = 1e-4
# the mixture is fitted on at most (spikes / this) principal components of the waveforms (GT 7 + GT 11's 4,305
# spikes: 430 of 432 dimensions, 178 wrong against 188 on all 432, 207 on 200, 288 on 100)
PEELED_SPLIT_EM_SPIKES_PER_DIMENSION = 10
# at most this many bytes of sampled waveforms at once (units are taken a group at a time)
PEELED_SPLIT_MAX_BYTES = 2**28


def unit_channels(dense, channel_table) -> np.ndarray:
    """(units, k) channels of each unit: the ``channel_table`` row of its template's biggest channel."""
    return channel_table[np.ptp(dense, axis=1).argmax(axis=1)]


def local_peeled_windows(residual, templates, spikes, channels):
    """Yield (positions in ``spikes``, peeled waveforms (n, T, k)): :func:`matching.peeled_windows` on the
    ``channels`` of each spike's unit ((units, k), unit i in row i)."""
    from .matching import peeled_windows

    for at, windows in peeled_windows(residual, templates, spikes, margin=0):
        rows = channels[spikes["unit_index"][at]]
        yield at, np.take_along_axis(windows, rows[:, None, :], axis=2)


def cut_in_two(waveforms, seed):
    """(PCA, fitted k-means) of ``waveforms`` (n, width, k) cut in two."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = waveforms.reshape(waveforms.shape[0], -1)
    pca = PCA(min(PEELED_SPLIT_PCA_COMPONENTS, *flat.shape), random_state=seed).fit(flat)
    kmeans = KMeans(2, n_init=5, random_state=seed).fit(pca.transform(flat))
    return pca, kmeans


def two_part_discriminant(features, parts, max_rounds=PEELED_SPLIT_EM_ROUNDS, tolerance=PEELED_SPLIT_EM_TOLERANCE):
    """(w, b): the linear rule ``features @ w + b > 0`` for part 1 of a two-Gaussian mixture with one shared
    covariance, fitted by expectation-maximisation from the hard ``parts`` (0 or 1) of ``features`` (n, d).

    The shared covariance is shrunk towards its mean variance with the Ledoit-Wolf weight of the starting parts
    (d can be near n). Each spike weighs in each part by its posterior, so the spikes near the boundary, which a
    hard relabelling would hand wholly to one side each round, no longer drag that part's mean towards the other.
    Dense-overlap 2002, GT 7 + GT 11's unit (4,305 peeled waveforms, 8 channels x 54 samples): 11.3 % of the two
    neurons' spikes in the wrong part with k-means, 6.4 % with a hard self-trained discriminant, 4.7 % with this
    (4.4 % for a discriminant trained on the true labels)."""
    from scipy.special import expit
    from sklearn.covariance import ledoit_wolf_shrinkage

    features, parts = np.asarray(features, dtype="float64"), np.asarray(parts, dtype="int64")
    if np.bincount(parts, minlength=2).min() == 0:
        raise ValueError("two_part_discriminant needs spikes in both parts to start from")
    center, basis = features.mean(axis=0), None
    components = max(1, features.shape[0] // PEELED_SPLIT_EM_SPIKES_PER_DIMENSION)
    if features.shape[1] > components:
        # with more dimensions than the spikes can pin down, any labelling is nearly separable and the fit stays
        # where it started (60 s small8, the two most alike neurons' 803 spikes x 840 samples, a fifth of each
        # neuron's spikes started on the other side: 14 % left on the wrong side; on 80 principal components 0.1 %)
        _, _, vt = np.linalg.svd(features - center, full_matrices=False)
        basis = vt[:components].T
        features = (features - center) @ basis
    n, d = features.shape
    gram = features.T @ features / n
    means = np.stack([features[parts == p].mean(axis=0) for p in (0, 1)])
    shrinkage = ledoit_wolf_shrinkage(features - means[parts], assume_centered=True)
    posterior = parts.astype("float64")  # of part 1
    for _ in range(max_rounds):
        weights = np.stack([1.0 - posterior, posterior])  # (2, n)
        totals = weights.sum(axis=1)
        if totals.min() < 1.0:  # one part has emptied: the last rule stands
            break
        means = weights @ features / totals[:, None]
        scatter = gram - (totals[:, None, None] * means[:, :, None] * means[:, None, :]).sum(axis=0) / n
        covariance = (1.0 - shrinkage) * scatter + shrinkage * np.trace(scatter) / d * np.eye(d)
        w = np.linalg.solve(covariance, means[1] - means[0])
        b = -0.5 * (means[0] + means[1]) @ w + np.log(totals[1] / totals[0])
        updated = expit(features @ w + b)
        converged = np.abs(updated - posterior).max() < tolerance
        posterior = updated
        if converged:
            break
    if basis is not None:
        w = basis @ w
        b = b - center @ w
    return w, b


def refine_parts(residual, templates, spikes, part_of, units, channels, min_spikes, seed):
    """``part_of`` (each spike's part, -1: none) of the spikes of ``units`` given by a two-part linear discriminant
    fitted to the parts themselves (:func:`two_part_discriminant`) on up to ``PEELED_SPLIT_EM_SAMPLE`` of each
    unit's peeled waveforms (whole window, the unit's channels).

    k-means on a few principal components weighs the collisions' variance like the neurons' difference; the
    discriminant, with the parts' shared covariance, weighs the difference against the collisions. A unit whose
    refined parts would fall under ``min_spikes`` keeps the k-means parts."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for unit in units:
        mine = np.flatnonzero((part_of >= 0) & (spikes["unit_index"] == unit))
        chosen[unit] = np.sort(rng.choice(mine, min(PEELED_SPLIT_EM_SAMPLE, mine.size), replace=False))
    train = np.sort(np.concatenate(list(chosen.values())))
    waveforms = np.zeros((train.size, templates.get_dense_templates().shape[1] * channels.shape[1]), dtype="float32")
    for at, windows in local_peeled_windows(residual, templates, spikes[train], channels):
        waveforms[at] = windows.reshape(at.size, -1)
    rules = {}
    for unit in units:
        features = waveforms[np.searchsorted(train, chosen[unit])]
        w, b = two_part_discriminant(features, part_of[chosen[unit]])
        refined = (features @ w + b > 0).astype("int64")
        if min(np.bincount(refined, minlength=2)) >= min_spikes:
            rules[unit] = (w, b)
    todo = np.flatnonzero((part_of >= 0) & np.isin(spikes["unit_index"], list(rules)))
    for at, windows in local_peeled_windows(residual, templates, spikes[todo], channels):
        units_here = spikes["unit_index"][todo[at]]
        for unit in np.unique(units_here):
            here = units_here == unit
            w, b = rules[unit]
            part_of[todo[at[here]]] = (windows[here].reshape(here.sum(), -1) @ w + b > 0).astype("int64")


def judge_cut(samples, parts, total_samples, sampling_frequency, min_spikes):
    """(part sizes, rate-profile overlap, refractory ratio, kept) of a unit's spikes at global ``samples`` cut into
    ``parts`` (0 or 1); kept where each part holds ``min_spikes`` spikes, the parts fire together over the recording
    and meet in the refractory period as two neurons do. Sizes None: a part too small to judge."""
    from .matching import MATCHED_SPLIT_MIN_RATE_OVERLAP
    from .pairwise import refractory_ratio, two_neurons_by_trains
    from .split import rate_profile_overlap

    trains = [np.sort(samples[parts == p]) for p in (0, 1)]
    sizes = [train.size for train in trains]
    if min(sizes) < min_spikes:
        return None, None, None, False
    overlap = rate_profile_overlap(trains[0], trains[1], total_samples)
    ratio = refractory_ratio(trains[0], trains[1], total_samples, sampling_frequency)
    kept = overlap is not None and overlap >= MATCHED_SPLIT_MIN_RATE_OVERLAP and two_neurons_by_trains(ratio)
    return sizes, overlap, ratio, kept


def split_peeled_units(recording, spikes, num_units, channel_table, noise_levels, params, job_kwargs, samples,
                       total_samples, protected=(), log=None):
    """(``spikes`` with each unit that holds two neurons split on its peeled waveforms, the unit each new unit was
    split from).

    Each unit's template (on every channel) is subtracted at each of its spikes, scaled by the spike's fitted
    amplitude; a unit's spikes are then looked at with their own template added back, on the channels around the
    template's biggest one (``channel_table``). k-means cuts a sample of them in two on their principal components
    (:func:`cut_in_two`), every spike of the unit is given to the nearer part, and the cut is kept where the parts
    fire together over the recording (rate-profile overlap at least ``matching.MATCHED_SPLIT_MIN_RATE_OVERLAP``),
    each looks like the whole (cosine at least ``matching.MATCHED_SPLIT_MIN_PART_SIMILARITY``), each holds at least
    ``min_cluster_size`` spikes and the two meet in the refractory period as two neurons do
    (:func:`pairwise.two_neurons_by_trains`). The smaller part becomes a new unit, numbered from ``num_units``.
    ``samples``: each spike's global sample index. ``protected`` units (a curator's) are not split.

    The kept cuts' parts are then refined by a discriminant trained on them (:func:`refine_parts`). Given to the
    part whose template fits them best instead (9k's reassignment between the two parts, white noise assumed),
    the two neurons of dense-overlap 2002 lost what the discriminant had gained (GT 7 0.78 -> 0.74, GT 11 0.58 ->
    0.55), and tetrode 2003's GT 0 and GT 5 0.97 and 0.86 -> 0.93 and 0.82.
    """
    from .matching import MATCHED_SPLIT_MIN_PART_SIMILARITY, has_full_window, residual_of_matching, unit_templates
    from .pairwise import template_similarity, two_neurons_by_trains
    from .split import MAX_LAG_SAMPLES

    seed, min_spikes = params["seed"], params["min_cluster_size"]
    templates = unit_templates(recording, spikes, spikes["unit_index"], num_units, noise_levels, params, job_kwargs,
                               sparse=False)
    dense = templates.get_dense_templates()  # (units, T, channels), unit i in row i
    nbefore, width = templates.nbefore, dense.shape[1]
    channels = unit_channels(dense, channel_table)
    inside = has_full_window(recording, spikes, nbefore, width - nbefore)
    counts = np.bincount(spikes["unit_index"][inside], minlength=num_units)
    candidates = np.setdiff1d(np.flatnonzero(counts >= 4 * min_spikes), protected)
    if candidates.size == 0:
        return spikes, np.zeros(0, dtype="int64")
    residual = residual_of_matching(recording, templates, spikes)

    rng = np.random.default_rng(seed)
    cuts = {}
    # a few units' samples at a time: a 384-channel probe's hundreds of units would hold gigabytes at once
    group = max(1, PEELED_SPLIT_MAX_BYTES // (4 * PEELED_SPLIT_SAMPLE * width * channels.shape[1]))
    for first in range(0, candidates.size, group):
        units = candidates[first:first + group]
        sample = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(inside & (spikes["unit_index"] == unit)), min(counts[unit], PEELED_SPLIT_SAMPLE),
                       replace=False) for unit in units]))
        sampled = np.zeros((sample.size, width, channels.shape[1]), dtype="float32")
        for at, waveforms in local_peeled_windows(residual, templates, spikes[sample], channels):
            sampled[at] = waveforms
        sampled_units = spikes["unit_index"][sample]
        for unit in units:
            mine = sampled[sampled_units == unit]
            pca, kmeans = cut_in_two(mine, seed)
            parts = kmeans.labels_
            whole = mine.mean(axis=0)
            similarity = min(template_similarity(mine[parts == p].mean(axis=0), whole, MAX_LAG_SAMPLES)[0]
                             for p in (0, 1))
            if similarity >= MATCHED_SPLIT_MIN_PART_SIMILARITY:
                cuts[unit] = (pca, kmeans, similarity)

    # every spike of a unit that may be cut, given to its nearer part
    part_of = np.full(spikes.size, -1, dtype="int64")
    todo = np.flatnonzero(inside & np.isin(spikes["unit_index"], list(cuts)))
    for at, waveforms in local_peeled_windows(residual, templates, spikes[todo], channels):
        units = spikes["unit_index"][todo[at]]
        for unit in np.unique(units):
            pca, kmeans, _ = cuts[unit]
            here = units == unit
            part_of[todo[at[here]]] = kmeans.predict(pca.transform(waveforms[here].reshape(here.sum(), -1)))

    spikes = spikes.copy()
    parents, ratios = [], {}
    cut_spikes = np.flatnonzero(part_of >= 0)
    for unit, (_, _, similarity) in cuts.items():
        mine = cut_spikes[spikes["unit_index"][cut_spikes] == unit]
        sizes, overlap, ratio, kept = judge_cut(samples[mine], part_of[mine], total_samples,
                                                recording.sampling_frequency, min_spikes)
        if sizes is None:
            continue
        ratios[int(unit)] = round(float(ratio), 2)
        if log is not None and two_neurons_by_trains(ratio):
            log(f"peeled waveforms of unit {unit}: parts of {sizes[0]} + {sizes[1]} spikes, parts to the unit "
                f"{similarity:.2f}, rate overlap {'too few spikes' if overlap is None else round(overlap, 2)}, "
                f"refractory ratio {ratio:.2f}: " + ("split" if kept else "kept whole"))
        if kept:
            parents.append(int(unit))
    if parents:
        refine_parts(residual, templates, spikes, part_of, parents, channels, min_spikes, seed)
        # the discriminant moved spikes between the parts: the trains must still say two neurons
        still = []
        for unit in parents:
            mine = np.flatnonzero((part_of >= 0) & (spikes["unit_index"] == unit))
            sizes, overlap, ratio, kept = judge_cut(samples[mine], part_of[mine], total_samples,
                                                    recording.sampling_frequency, min_spikes)
            if kept:
                still.append(unit)
            elif log is not None:
                log(f"peeled waveforms of unit {unit}: the refined parts no longer look like two neurons "
                    f"(sizes {sizes}, rate overlap {overlap}, refractory ratio {ratio}): kept whole")
        parents = still
    for number, unit in enumerate(parents):
        mine = np.flatnonzero((part_of >= 0) & (spikes["unit_index"] == unit))
        smaller = int(np.argmin(np.bincount(part_of[mine], minlength=2)))
        spikes["unit_index"][mine[part_of[mine] == smaller]] = num_units + number
    if log is not None:
        log(f"peeled waveforms: {len(cuts)} of {candidates.size} units cut in two with parts like the unit, "
            f"{len(parents)} split; refractory ratios of the cuts {ratios}")
    return spikes, np.asarray(parents, dtype="int64")
