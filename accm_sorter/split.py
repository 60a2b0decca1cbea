"""Stage 8b: split units that hold more than one neuron, and join units that are one.

The contrastive embedding is trained to ignore what varies within a neuron (jitter, amplitude,
noise, collisions), and sometimes it also ignores the small waveform differences between two
neurons at the same place. Each unit is therefore looked at once more on its own: its spikes'
waveforms on the unit's channels are reduced by PCA and clustered by HDBSCAN. A split is kept only
when the parts' mean waveforms really differ (cosine similarity below ``max_similarity`` at every
small lag), so one neuron's amplitude drift or noisy tail is not cut in two.
"""

from __future__ import annotations

import numpy as np

from .cluster import cluster_features
from .pairwise import template_similarity

PCA_COMPONENTS = 6
MAX_SPIKES_PER_SPLIT = 4000
MAX_LAG_SAMPLES = 2
DUPLICATE_AMPLITUDE_RATIO = 0.8
# ... or peaks within this many noise levels of each other: a neuron 2-3 noise levels tall that
# clustering cut in pieces along its noise has pieces whose peaks differ by more than 20 % but by less
# than a noise level (dense-overlap seed 2002: GT 16, 2.6 and 2.8 noise levels, ratio 0.79)
DUPLICATE_MAX_PEAK_DIFFERENCE = 1.0
ISOCUT_THRESHOLD = 2.0
# Two units less alike than duplicate_min_similarity, down to this cosine, are joined when their
# trains never collide in the refractory period and there are enough spikes for that test to mean
# something: on drift, where motion correction leaves one neuron's parts 0.85-0.97 alike, that
# joined them (19 -> 21/25 well detected); joining at 0.85 without the test merged distinct small
# neurons on low-snr.
TRAIN_CONFIRMED_MIN_SIMILARITY = 0.85
# Where motion correction leaves a residual, a neuron at the far end of its travel comes out as a
# second, smaller unit (peak 0.67-0.8 of the first, cosine 0.79-0.91) that fires only while the first
# is silent (drift, seed 2002: four neurons cut 80/20 this way). Such pairs are joined when their
# firing-rate profiles over time barely overlap: 0.05-0.30 for those four, 0.84-0.91 for every pair
# of distinct neurons alike enough on seven benchmark runs, but 0.29 and 0.42 for two pairs of distinct
# drift neurons whose cosine (0.69, 0.61) is below DRIFT_SPLIT_MIN_SIMILARITY.
DRIFT_SPLIT_MIN_SIMILARITY = 0.75
DRIFT_SPLIT_AMPLITUDE_RATIO = 0.6
DRIFT_SPLIT_MAX_RATE_OVERLAP = 0.35
# Motion correction interpolates a neuron whose footprint is narrower than the channel pitch unevenly:
# at some displacements its waveform comes out smeared. On drift seed 2003 one neuron (GT 12, 5 um
# from the probe) came out as three pure units only 0.56-0.73 alike, each firing at its own set of
# probe positions (overlap of their profiles over the estimated displacement 0.14-0.19) while their
# firing over time overlapped 0.54-0.57. Where a motion estimate exists, units this alike are joined
# when their position profiles barely overlap; see docs/method.md for the distinct pairs' figures.
POSITION_SPLIT_MIN_SIMILARITY = 0.5
# A neuron beyond the probe's end (drift seed 2004: GT 13, 6 um past the last channel row) moves further off it at one
# end of its travel, and there its corrected spikes are smaller: motion correction moves a waveform, it cannot bring
# back what no channel recorded (GT 13: a pure piece of 123 spikes at peak 0.42 of the other's, cosine 0.72, firing only
# at displacements 8.6-17.7 um while the other fired at -19.6-7.3 um). Pieces that fire at different probe positions
# are joined down to this amplitude ratio where one fires on one side of the other's positions (POSITION_SIDE_QUANTILE);
# pieces smeared at interleaved positions keep DRIFT_SPLIT_AMPLITUDE_RATIO, as does the rate rule. On drift seed 2003 a
# piece of GT 11 (amplitude ratio under 0.6, position overlap 0.26 with a piece of GT 12) was joined to it without the
# side test.
POSITION_SPLIT_AMPLITUDE_RATIO = 0.4
# ... that is, all but this share of one piece's positions lie beyond all but this share of the other's (on_one_side)
POSITION_SIDE_QUANTILE = 0.05
# A part of a unit's spikes too small for a rate profile (under MIN_RATE_BINS bins) is another neuron's spikes, where
# the probe moved, when the rest of the unit fires at the part's probe positions at least this share as often as the
# time the probe spent there predicts (position_coexistence, matching.stray_parts): one neuron's piece from one end
# of its travel has the rest absent there. Drift seed 2002: 83 of GT 4's spikes from the far end of its travel sat in
# GT 20's unit; their part (78 sampled spikes) fired where the probe spent 0.07 of the time, the rest 1.07 times as
# often as that predicts.
MIN_POSITION_COEXISTENCE = 0.5
# ... and fires only over part of the travel, at positions where the probe spent at most this share of the time: a
# part that small is no whole neuron (2 Hz over the benchmark's 120 s is 240 spikes); spread along the travel it is a
# share of the unit's own neuron's spikes. GT 4's piece above: 0.07 of the time. Drift seed 2004: GT 8's unit (583
# sampled spikes) came in parts of 40, 499 and 44, coexistence 0.97-1.25 but over 0.52-0.56 of the time; split
# off, the small parts' templates took GT 8 0.97 -> 0.65 and GT 12 0.99 -> 0.91.
MAX_POSITION_TIME_SHARE = 0.3
# Another neuron's spikes in a unit collide with a second piece of the unit's neuron as often as chance. Two units
# whose refractory ratio fails the join's limit are still one neuron when their core spikes (those most like their
# template, ``matching.core_spikes``) collide at most this often: once contamination is left out, one neuron's
# pieces hardly collide at all. Dense-overlap seed 2003: two pieces of one neuron 0.41 on all spikes, 0.00 on their
# core; two neurons of one shape at two sizes (tetrode), whose units each held some of the other's spikes, 0.31 and
# 0.19; two neurons 4 um apart (dense-overlap seed 2002) 0.59 and 0.58.
CORE_MAX_REFRACTORY_RATIO = 0.1
SPIKES_PER_RATE_BIN = 20  # bins hold this many of the smaller unit's spikes on average ...
MIN_RATE_BINS = 4  # ... and a unit too small for this many bins is never judged by its rate profile


def aligned_waveforms(snippets, main_channels, channel_table, index, target_channels):
    """Snippets of ``index`` on ``target_channels``; spikes whose snippet lacks one of them are left out."""
    rows = channel_table[main_channels[index]]  # (n, K) global channel of each snippet row
    position = np.full((index.size, target_channels.size), -1, dtype="int64")
    for j, channel in enumerate(target_channels):
        hit = rows == channel
        position[:, j] = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    complete = (position >= 0).all(axis=1)
    chosen = index[complete]
    waves = snippets[chosen[:, None], position[complete]]  # (n, C, T)
    return chosen, waves


def split_channel_table(channel_table):
    """The channels a split looks at around each main channel: the first half of its local-channel row."""
    return channel_table[:, : max(1, channel_table.shape[1] // 2)]


def waveforms_from_snippets(snippets, main_channels, channel_table):
    """Waveform source for :func:`split_mixed_units`: a set of spikes on the split channels of the
    channel most of them peak on, out of their own snippets; spikes whose snippet lacks one of those
    channels are left out."""
    split_table = split_channel_table(channel_table)

    def waveforms_of(index):
        main = np.bincount(main_channels[index]).argmax()
        return aligned_waveforms(snippets, main_channels, channel_table, index, split_table[main])

    return waveforms_of


def waveforms_from_traces(recording, peaks, labels, channel_table, nbefore, nafter, job_kwargs):
    """Waveform source for :func:`split_mixed_units`: every spike on its unit's channels
    (:func:`unit_centred_waveforms`); none is left out."""
    waveforms = unit_centred_waveforms(recording, peaks, labels, channel_table, nbefore, nafter, job_kwargs)

    def waveforms_of(index):
        return index, waveforms[index]

    return waveforms_of


def unit_centred_waveforms(recording, peaks, labels, channel_table, nbefore, nafter, job_kwargs):
    """Each assigned spike cut on its unit's channels: the first half of the unit's main-channel row.

    A unit's spikes have different main channels (two neurons 15 um apart, or one whose spikes
    peak on either of two channels), and a snippet holds only its own spike's neighbourhood:
    comparing them on common channels out of the snippets dropped two thirds of one neuron's
    spikes from a two-neuron unit (low-snr, seed 2002), so the split never saw it. Rows of
    unassigned spikes are zero.
    """
    from .snippets import extract_snippets

    half = split_channel_table(channel_table)
    waveforms = np.zeros((peaks.size, half.shape[1], nbefore + nafter), dtype="float32")
    assigned = np.flatnonzero(labels >= 0)
    if assigned.size == 0:
        return waveforms
    num_units = int(labels.max()) + 1
    unit_main = np.zeros(num_units, dtype="int64")
    for unit in range(num_units):
        mine = peaks["channel_index"][labels == unit]
        if mine.size:
            unit_main[unit] = np.bincount(mine).argmax()
    centred = peaks[assigned].copy()
    centred["channel_index"] = unit_main[labels[assigned]]
    order = np.lexsort((centred["sample_index"], centred["segment_index"]))
    waveforms[assigned[order]] = extract_snippets(recording, centred[order], half, nbefore, nafter, job_kwargs)
    return waveforms


def find_parts(features, min_cluster_size, clusterer, seed):
    """Part labels (-1 = none) of one unit's PCA features."""
    if clusterer == "hdbscan":
        return cluster_features(features, max(min_cluster_size, features.shape[0] // 20))[0]
    from spikeinterface.sortingcomponents.clustering.isosplit_isocut import isosplit

    # isosplit starts from an over-clustering by k-means and joins neighbours whose 1-D projection
    # has no dip; n_init as SpikeInterface's local split uses it (a unit rarely hides more than 4-5)
    n_init = int(min(15, max(2, features.shape[0] // (2 * min_cluster_size))))
    parts = isosplit(features, n_init=n_init, min_cluster_size=min_cluster_size, max_iterations_per_pass=500,
                     isocut_threshold=ISOCUT_THRESHOLD, seed=seed)
    # small parts are mostly collisions with another unit's spike: they join their nearest part
    # below instead of becoming units of their own
    sizes = np.bincount(parts)
    small = sizes < max(min_cluster_size, features.shape[0] // 20)
    return np.where(small[parts], -1, parts)


def split_mixed_units(labels, waveforms_of, min_cluster_size, max_similarity, seed, max_depth, clusterer,
                      protected=(), log=None, pca_components=PCA_COMPONENTS) -> tuple[np.ndarray, list]:
    """Labels with mixed units split into their parts (new units numbered after the existing ones).

    ``waveforms_of(index)`` returns the spikes of ``index`` it has waveforms for and those
    waveforms (spikes, channels, samples), all on one channel set: :func:`waveforms_from_snippets`
    or :func:`waveforms_from_traces`. Spikes left out keep their unit. The parts of a split are tried again, each with its own PCA,
    up to ``max_depth`` levels: the first PCA of a mixture of several neurons is dominated by the
    most different one.
    """
    from sklearn.decomposition import PCA

    labels = labels.copy()
    rng = np.random.default_rng(seed)
    report = []
    num_units = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    queue = [(int(unit), 1) for unit in np.setdiff1d(np.arange(num_units), protected)]
    while queue:
        unit, depth = queue.pop(0)
        index = np.flatnonzero(labels == unit)
        if index.size < 4 * min_cluster_size:
            continue
        chosen, waves = waveforms_of(index)
        if chosen.size < 4 * min_cluster_size:
            continue
        fit = np.sort(rng.choice(chosen.size, min(chosen.size, MAX_SPIKES_PER_SPLIT), replace=False))
        flat = waves.reshape(chosen.size, -1)
        pca = PCA(min(pca_components, *flat[fit].shape), random_state=seed).fit(flat[fit])
        parts = find_parts(pca.transform(flat[fit]), min_cluster_size, clusterer, seed)
        kept_parts = np.unique(parts[parts >= 0])
        if kept_parts.size < 2:
            continue
        parts = np.where(parts >= 0, np.searchsorted(kept_parts, parts), -1)
        num_parts = kept_parts.size
        means = np.stack([flat[fit][parts == p].mean(axis=0) for p in range(num_parts)])
        shape = waves.shape[1:]
        similarity = min(template_similarity(means[a].reshape(shape), means[b].reshape(shape), MAX_LAG_SAMPLES)[0]
                         for a in range(num_parts) for b in range(a + 1, num_parts))
        if similarity >= max_similarity:
            continue
        # every spike of the unit goes to the part whose mean waveform it is closest to
        projected_means = pca.transform(means)
        nearest = np.linalg.norm(pca.transform(flat)[:, None, :] - projected_means[None], axis=2).argmin(axis=1)
        new_ids = np.concatenate([[unit], labels.max() + 1 + np.arange(num_parts - 1)])
        labels[chosen] = new_ids[nearest]
        if depth < max_depth:
            queue.extend((int(part), depth + 1) for part in new_ids)
        report.append(dict(unit=int(unit), depth=depth, parts=num_parts, min_similarity=round(float(similarity), 3),
                           sizes=np.bincount(nearest, minlength=num_parts).tolist()))
        if log is not None:
            log(f"split unit {unit} into {num_parts} (waveform similarity {similarity:.2f})")
    return labels, report


def profile_overlap(values_a, values_b, low, high) -> float | None:
    """Shared fraction of two units' spikes over bins of a per-spike value (time, probe position).

    The sum over bins of the smaller of the two normalised histograms: 1 for two neurons that fire
    alike all along the value's range, near 0 for a pair that takes turns. The number of bins follows
    the smaller unit (``SPIKES_PER_RATE_BIN`` spikes a bin) so Poisson noise stays small; ``None`` when
    it has too few spikes for ``MIN_RATE_BINS`` bins or the range is empty.
    """
    num_bins = min(values_a.size, values_b.size) // SPIKES_PER_RATE_BIN
    if num_bins < MIN_RATE_BINS or not high > low:
        return None
    counts_a = np.histogram(values_a, bins=num_bins, range=(low, high))[0]
    counts_b = np.histogram(values_b, bins=num_bins, range=(low, high))[0]
    return float(np.minimum(counts_a / counts_a.sum(), counts_b / counts_b.sum()).sum())


def position_span(values, quantile=POSITION_SIDE_QUANTILE) -> tuple[float, float]:
    """(low, high): the span of a unit's probe positions without ``quantile`` of them at each end."""
    low, high = np.quantile(values, [quantile, 1 - quantile])
    return float(low), float(high)


def on_one_side(values_a, values_b, quantile=POSITION_SIDE_QUANTILE) -> bool:
    """True where all but ``quantile`` of one unit's values (probe positions) lie beyond all but ``quantile`` of the
    other's: a neuron seen smaller at one end of its travel, not pieces that take turns across it."""
    low_a, high_a = position_span(values_a, quantile)
    low_b, high_b = position_span(values_b, quantile)
    return bool(high_a <= low_b or high_b <= low_a)


def position_coexistence(part_positions, rest_positions, probe_positions,
                          quantile=POSITION_SIDE_QUANTILE) -> tuple[float, float]:
    """(How often the rest of a unit fires at a part's probe positions (all but ``quantile`` of them at each end)
    over how often the time the probe spent there predicts, that share of time) for ``probe_positions`` the probe's
    displacement at evenly spaced times. The first is about 1 for two neurons firing all along, near 0 for one
    neuron's pieces that take turns across its travel; the second is 1 for a part that fires all along the travel."""
    low, high = position_span(part_positions, quantile)
    time_share = float(np.mean((probe_positions >= low) & (probe_positions <= high)))
    if time_share == 0:
        return 0.0, 0.0
    return float(np.mean((rest_positions >= low) & (rest_positions <= high)) / time_share), time_share


def rate_profile_overlap(train_a, train_b, total_samples) -> float | None:
    """Shared fraction of two units' firing over time (``profile_overlap`` of their spike times)."""
    return profile_overlap(train_a, train_b, 0, total_samples)


def merge_duplicate_units(labels, templates, samples, total_samples, sampling_frequency, min_similarity,
                          protected=(), join_drift_splits=False, positions=None, noise_levels=None, core=None,
                          unsparsified=None, log=None) -> tuple[np.ndarray, list]:
    """Join units with the same mean waveform whose spike trains never collide in the refractory period.

    Clustering can cut one big neuron into pieces (probe32, seed 2002: a unit of 1631 spikes came out
    as four units whose templates have cosine 0.996-1.0); the pairwise merge runs before splitting
    and does not see the pieces a split leaves. Two units are joined when their templates
    (``templates``, (units, channels, T)) have cosine >= ``min_similarity`` at lags <= 2 samples,
    peak amplitudes within 20 % (or within ``DUPLICATE_MAX_PEAK_DIFFERENCE`` of the channels'
    ``noise_levels``, where given), and the refractory guard of the pairwise merge holds; down to
    ``TRAIN_CONFIRMED_MIN_SIMILARITY`` when the refractory test is informative and finds no
    collision. With ``join_drift_splits``, units down to ``DRIFT_SPLIT_MIN_SIMILARITY`` alike and
    ``DRIFT_SPLIT_AMPLITUDE_RATIO`` in amplitude are joined when they take turns firing
    (``rate_profile_overlap`` at most ``DRIFT_SPLIT_MAX_RATE_OVERLAP``): one neuron seen at two
    places. ``positions`` (the estimated probe displacement at each spike, from the motion estimate)
    extends that to units down to ``POSITION_SPLIT_MIN_SIMILARITY`` alike that fire at different probe
    positions (their ``profile_overlap`` over ``positions`` at most the same limit), and down to
    ``POSITION_SPLIT_AMPLITUDE_RATIO`` in amplitude where one fires on one side of the other's positions
    (``on_one_side``: a neuron beyond the probe's end, smaller at the end of its travel that takes it further off).
    ``core`` (None, or a function returning a boolean per spike, called once and only when needed): a pair whose
    refractory test fails on all their spikes passes when their core spikes collide at most
    ``CORE_MAX_REFRACTORY_RATIO`` of chance (another neuron's spikes in a unit collide with a second piece of the
    unit's neuron as often as chance and hide that the two are one).
    ``unsparsified`` (None, or the same templates on every channel): two units are also compared on the channels
    either of them reaches (where ``templates`` are non-zero), and the duplicate tests take the larger cosine: a
    faint neuron between two channels comes out as two units, each sparsified to the channels its own mean passes,
    that share only some of them (low-snr seed 2003: cosine 0.52 on the sparse templates, 0.87 on both units'
    channels). The drift rules keep the sparse cosine.
    ``protected`` units (a curator's) are never joined.
    """
    from .pairwise import UNINFORMATIVE_REFRACTORY_RATIO, refractory_ratio, two_neurons_by_trains

    num_units = templates.shape[0]
    peak = np.abs(templates).max(axis=(1, 2))
    # each unit's peak in noise levels of its channels, for the noise-level tolerance
    peak_snr = (np.abs(templates).max(axis=2) / noise_levels[None, :]).max(axis=1) if noise_levels is not None else None
    lowest_similarity = min(min_similarity, TRAIN_CONFIRMED_MIN_SIMILARITY)
    lowest_amplitude_ratio = DUPLICATE_AMPLITUDE_RATIO
    if join_drift_splits:
        lowest_similarity = min(lowest_similarity, DRIFT_SPLIT_MIN_SIMILARITY)
        lowest_amplitude_ratio = DRIFT_SPLIT_AMPLITUDE_RATIO
        # a motion estimate of 0 all along (no drift) gives no positions to tell pieces apart
        if positions is not None and positions.size and np.ptp(positions) > 0:
            lowest_similarity = min(lowest_similarity, POSITION_SPLIT_MIN_SIMILARITY)
            lowest_amplitude_ratio = min(lowest_amplitude_ratio, POSITION_SPLIT_AMPLITUDE_RATIO)
            position_range = (float(positions.min()), float(positions.max()))
        else:
            positions = None
    candidates = []
    for a in np.setdiff1d(np.arange(num_units), protected):
        for b in np.setdiff1d(np.arange(a + 1, num_units), protected):
            amplitude_ratio = min(peak[a], peak[b]) / max(peak[a], peak[b], 1e-12)
            if peak_snr is not None and abs(peak_snr[a] - peak_snr[b]) <= DUPLICATE_MAX_PEAK_DIFFERENCE:
                amplitude_ratio = max(amplitude_ratio, DUPLICATE_AMPLITUDE_RATIO)  # alike within the noise
            if amplitude_ratio < lowest_amplitude_ratio:
                continue
            cosine, _ = template_similarity(templates[a], templates[b], MAX_LAG_SAMPLES)
            shared = cosine
            if unsparsified is not None:
                reached = (np.abs(templates[a]).max(axis=1) > 0) | (np.abs(templates[b]).max(axis=1) > 0)
                shared = max(cosine, template_similarity(unsparsified[a][reached], unsparsified[b][reached],
                                                         MAX_LAG_SAMPLES)[0])
            if shared >= lowest_similarity:
                candidates.append((shared, cosine, a, b, amplitude_ratio))
    group = np.arange(num_units)
    report = []
    core_mask = None
    for shared, cosine, a, b, amplitude_ratio in sorted(candidates, reverse=True):
        ga, gb = group[a], group[b]
        if ga == gb:
            continue
        in_a = np.isin(labels, np.flatnonzero(group == ga))
        in_b = np.isin(labels, np.flatnonzero(group == gb))
        train_a, train_b = np.sort(samples[in_a]), np.sort(samples[in_b])
        ratio = refractory_ratio(train_a, train_b, total_samples, sampling_frequency)
        on_core = ""
        if two_neurons_by_trains(ratio):
            if core is None:
                continue
            core_mask = core() if core_mask is None else core_mask
            core_ratio = refractory_ratio(np.sort(samples[in_a & core_mask]), np.sort(samples[in_b & core_mask]),
                                          total_samples, sampling_frequency)
            if core_ratio > CORE_MAX_REFRACTORY_RATIO:
                continue
            on_core = f" on their core spikes, {ratio:.2f} on all"
            ratio = core_ratio
        # below min_similarity only an informative refractory test can show that two units are one
        duplicate = amplitude_ratio >= DUPLICATE_AMPLITUDE_RATIO and (shared >= min_similarity or (
            shared >= TRAIN_CONFIRMED_MIN_SIMILARITY and ratio != UNINFORMATIVE_REFRACTORY_RATIO))
        turns = {}
        if not duplicate and join_drift_splits:
            if cosine >= DRIFT_SPLIT_MIN_SIMILARITY and amplitude_ratio >= DRIFT_SPLIT_AMPLITUDE_RATIO:
                turns["rate_overlap"] = rate_profile_overlap(train_a, train_b, total_samples)
            if positions is not None and cosine >= POSITION_SPLIT_MIN_SIMILARITY and (
                    amplitude_ratio >= DRIFT_SPLIT_AMPLITUDE_RATIO or on_one_side(positions[in_a], positions[in_b])):
                turns["position_overlap"] = profile_overlap(positions[in_a], positions[in_b], *position_range)
            turns = {name: round(value, 3) for name, value in turns.items()
                     if value is not None and value <= DRIFT_SPLIT_MAX_RATE_OVERLAP}
        if not (duplicate or turns):
            continue
        group[group == gb] = ga
        entry = dict(a=int(a), b=int(b), template_cosine=round(float(shared), 4),
                     refractory_ratio=round(float(ratio), 3))
        entry.update(turns)
        report.append(entry)
        if log is not None:
            why = ", they take turns firing: " + ", ".join(
                f"{name.replace('_', '-profile ')} {value:.2f}" for name, value in turns.items()) if turns else ""
            log(f"joined duplicate units {a} and {b} (template cosine {shared:.3f}, refractory ratio {ratio:.2f}"
                f"{on_core}{why})")
    _, new_id = np.unique(group, return_inverse=True)
    return np.where(labels >= 0, new_id[np.clip(labels, 0, None)], -1), report
