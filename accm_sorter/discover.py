"""Stage 9d: find the units that detection saw too rarely to cluster, on what matching left over.

A small neuron (peak 2-4x the noise) crosses the plain threshold on only 15-30 % of its spikes,
too few and too scattered for the embedding to give it a cluster of its own, so it never gets a
template. Once template matching has found every spike of the units accm knows, those spikes
are subtracted from the traces. What remains is noise plus the neurons nobody has a template
for, and a matched filter sees them there (low-snr, seed 2003: 5,515 peaks on the residual, 94 %
of them real spikes, covering 78-100 % of the spikes of five units no cluster had held).

The contrastive encoder was trained on the detected spikes, which the big units dominate; on the
residual peaks its embedding put three small neurons into one cluster (4,683 spikes). The
residual peaks are therefore clustered the way SpikeInterface's lupin clusters all its peaks:
SVD features over the local channels and recursive isosplit (``iterative-isosplit``), which
separated them. Their templates join accm's for a second matching pass over the whole recording.

The smallest neurons (2-3 noise levels) are below what the matching engine's own detector looks at,
so a template does not bring their spikes back. The residual peaks that no discovered unit took are
clustered a second time, with a lower template cleaning, into small units that keep those peaks as
their spikes (dense-overlap seed 2002: four GT units that had no unit at 0.55-0.73).
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy

import numpy as np

from .detect import detect_spikes, spike_prototype
from .matching import spike_dtype
from .sorting_tools import time_ordered

# SVD features as lupin takes them for clustering (SpikeInterface 0.105 defaults of the sorter)
FEATURE_MS_BEFORE = 0.3
FEATURE_MS_AFTER = 1.3
FEATURE_RADIUS_UM = 120.0
FEATURE_COMPONENTS = 5
SPLIT_PCA_FEATURES = 4
# lupin's template cleaning inside the clustering: templates whose peak sits more than 0.2 ms off the
# spike time are noise or parts of collisions, and so are templates below 4 noise levels peak-to-peak
# on every channel, for units matched like the others ...
MATCHED_MIN_SNR = 4.0
# ... while the small units (``discover_small_units``) go down to 2.5: dense-overlap 2002's GT 14, 15
# and 19 (2.2-2.9 noise levels, 1,900-2,900 residual peaks each) were clusters of their own there
SMALL_MIN_SNR = 2.5
CLEAN_MAX_JITTER_MS = 0.2
CLEAN_SPARSIFY_THRESHOLD = 1.0
# a new unit needs at least this many residual spikes: noise clusters had 2-30 on low-snr
MIN_SPIKES_FACTOR = 2
# a discovered unit meeting a known unit's spikes this many times more often than chance copies it there ...
COPY_CHANCE_FACTOR = 4.0
COPY_MIN_FRACTION = 0.05
# ... and one whose spikes are mostly such copies is no unit of its own
MAX_COPIED_FRACTION = 0.5
# second passes run to drop copies before discovery gives up and keeps the first pass
MAX_PASSES = 3
# templates peaking below this many noise levels are matched once more on the residual, by wobble
SMALL_TEMPLATE_MAX_SNR = 5.0
# ... and each keeps a spike where its fit explains at least this fraction of the template (wobble's
# own threshold, 50 on 2<t, x> - |t|^2, asked the faintest templates, |t|^2 = 34-50, for more than 1.0)
SMALL_TEMPLATE_MIN_SCALE = 0.7
# ... and the template's correlation there is this many times its spread on the residual, where a
# template too faint to tell from noise (|t|^2 = 6-20 on dense-overlap 2002) would fit noise everywhere
SMALL_TEMPLATE_MIN_Z = 4.0
# ... and that looser bar stands only where the template's peaks over it on the residual outnumber its
# sign-flipped template's this many times, both counted away from the spikes found so far (what a
# subtraction left is no noise: low-snr 2002, 59 of GT 7's template's 69 flipped peaks sat there): the flipped
# template's count is what noise gives, so 2 is a false-discovery rate of about 1/2, where adding spikes stops
# raising a unit's accuracy. Elsewhere the template is held to wobble's own threshold.
SMALL_TEMPLATE_MIN_EXCESS = 2.0
# wobble fits at a sub-sample shift: the correlation at the spike's own sample is up to this much lower
SUBSAMPLE_LOSS = 0.05


def cluster_residual_peaks(residual, peaks, noise_levels, min_snr, min_firing_rate, seed, job_kwargs):
    """Cluster labels (-1 = none) of the residual's peaks by SpikeInterface's iterative isosplit."""
    from spikeinterface.sortingcomponents.clustering import find_clusters_from_peaks
    from spikeinterface.sortingcomponents.clustering.method_list import clustering_methods

    kwargs = deepcopy(clustering_methods["iterative-isosplit"]._default_params)
    kwargs["peaks_svd"].update(ms_before=FEATURE_MS_BEFORE, ms_after=FEATURE_MS_AFTER, radius_um=FEATURE_RADIUS_UM,
                               n_components=FEATURE_COMPONENTS)
    kwargs["split"]["method_kwargs"]["n_pca_features"] = SPLIT_PCA_FEATURES
    kwargs["clean_templates"].update(min_snr=min_snr, max_jitter_ms=CLEAN_MAX_JITTER_MS,
                                     sparsify_threshold=CLEAN_SPARSIFY_THRESHOLD)
    kwargs["clean_low_firing"]["min_firing_rate"] = min_firing_rate
    kwargs.update(noise_levels=noise_levels, seed=seed, verbose=False)
    _, labels = find_clusters_from_peaks(residual, peaks, method="iterative-isosplit", method_kwargs=kwargs,
                                         job_kwargs=job_kwargs)
    return np.asarray(labels, dtype="int64")


def discover_units(recording, templates, spikes, noise_levels, params, job_kwargs, first_unit_id, log=None):
    """Units found on the residual of matching: (templates to match, small units), each ``None`` when there is none.

    ``templates`` and ``spikes`` are the first matching pass. The residual's peaks are clustered with
    lupin's template cleaning at ``MATCHED_MIN_SNR``; a cluster of at least
    ``MIN_SPIKES_FACTOR * min_cluster_size`` spikes whose template's peak-to-peak reaches
    ``discover_min_snr`` noise levels on its best channel is matched like any unit, its template numbered
    from ``first_unit_id`` on. With ``discover_small_units`` the peaks no such unit took are clustered
    again, cleaned at ``SMALL_MIN_SNR``, into small units (``SmallUnits``, numbered from 0): tdc-peeler's
    detector, at ``matching_threshold``, never looks where spikes this small are, so they keep the peaks
    the matched filter found on the residual.
    """
    from .matching import residual_of_matching

    residual = residual_of_matching(recording, templates, spikes)
    matched_filter = dict(params, detect_method="matched_filtering")
    prototype = spike_prototype(recording, noise_levels, matched_filter, job_kwargs)
    peaks = detect_spikes(residual, noise_levels, params, job_kwargs, prototype)
    min_spikes = MIN_SPIKES_FACTOR * params["min_cluster_size"]
    if peaks.size < min_spikes:
        if log is not None:
            log(f"discovery: {peaks.size} peaks on the residual of matching, too few to cluster")
        return None, None
    found, labels, snr = residual_clusters(residual, peaks, MATCHED_MIN_SNR, min_spikes, noise_levels, params,
                                           job_kwargs)
    kept = snr >= params["discover_min_snr"]
    if log is not None:
        log(f"discovery: {peaks.size} peaks on the residual of matching, {snr.size} clusters of >= {min_spikes} "
            f"spikes, {int(kept.sum())} kept as new units (template SNR {np.round(np.sort(snr)[::-1], 1).tolist()})")
    to_match = templates_of(found, np.asarray(found.unit_ids)[kept], first_unit_id) if kept.any() else None
    if not params["discover_small_units"]:
        return to_match, None
    left = peaks[~np.isin(labels, np.flatnonzero(kept))]
    if left.size < min_spikes:
        return to_match, None
    found, labels, snr = residual_clusters(residual, left, SMALL_MIN_SNR, min_spikes, noise_levels, params,
                                           job_kwargs)
    if log is not None:
        log(f"discovery: {left.size} peaks left, {snr.size} small units of >= {min_spikes} spikes (template SNR "
            f"{np.round(np.sort(snr)[::-1], 1).tolist()})")
    if snr.size == 0:
        return to_match, None
    mine = labels >= 0
    small_spikes = np.zeros(int(mine.sum()), dtype=spike_dtype)
    small_spikes["sample_index"] = left["sample_index"][mine]
    small_spikes["segment_index"] = left["segment_index"][mine]
    small_spikes["unit_index"] = labels[mine]
    small_spikes["amplitude"] = 1.0
    return to_match, SmallUnits(found, small_spikes)


def residual_clusters(residual, peaks, min_snr, min_spikes, noise_levels, params, job_kwargs):
    """(templates, labels, best-channel SNR) of the clusters of ``peaks`` with at least ``min_spikes`` spikes.

    Labels number those clusters from 0 (-1: none); the SNR is the template's peak-to-peak on its best
    channel over the median noise level.
    """
    from .matching import unit_templates

    labels = cluster_residual_peaks(residual, peaks, noise_levels, min_snr, params["min_firing_rate"],
                                    params["seed"], job_kwargs)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, dtype="int64")
    big = np.flatnonzero(sizes >= min_spikes)
    renumber = np.full(sizes.size + 1, -1, dtype="int64")  # the last entry maps -1 to -1
    renumber[big] = np.arange(big.size)
    labels = renumber[labels]
    if big.size == 0:
        return None, labels, np.zeros(0)
    found = unit_templates(residual, peaks, labels, big.size, noise_levels, params, job_kwargs)
    # a cluster without a template (none of its spikes had a full window) is no unit
    labels = np.where(np.isin(labels, np.asarray(found.unit_ids)), labels, -1)
    found = templates_of(found, np.asarray(found.unit_ids), 0)
    labels = np.where(labels >= 0, np.searchsorted(np.unique(labels[labels >= 0]), labels), -1)
    noise = np.median(noise_levels[np.isfinite(noise_levels)])
    return found, labels, np.ptp(found.get_dense_templates(), axis=1).max(axis=1) / noise


def templates_of(templates, unit_ids, first_unit_id):
    """``templates``' units ``unit_ids``, renumbered from ``first_unit_id``."""
    return dataclasses.replace(templates.select_units(unit_ids),
                               unit_ids=first_unit_id + np.arange(len(unit_ids)))


def find_copies(unit_index, samples, first_unit_index, first_samples, new_ids, window, total_samples,
                protected=()):
    """Which of a second pass's spikes are copies of a known unit's, and the known units each discovered unit copies.

    A discovered unit is new where its spikes are new: they were on the residual because the first
    pass had no template for them. Where a template fits its neuron imperfectly (motion interpolation,
    a big neuron's amplitude jitter) its subtraction leaves a remnant, and a discovered unit can match
    that remnant at the neuron's spike times. A real neuron's spikes meet a known unit's within
    ``window`` samples by chance (with probability ``1 - exp(-rate * (2 window + 1))``; 1-2 % for one
    unit at 15-25 Hz and the censor window's +-0.4 ms); a discovered unit that meets a known unit's
    first-pass spikes at least ``COPY_CHANCE_FACTOR`` times as often, and on at least ``COPY_MIN_FRACTION`` of its spikes, copies
    that unit there, and those spikes are marked. Returns (mask over the second pass's spikes,
    {discovered: [(known, fraction of its spikes), ...]}). ``protected`` (curated) units are not looked at.
    """
    from .sorting_tools import distance_to_nearest

    first_units = np.setdiff1d(np.unique(first_unit_index), protected)
    first_trains = [np.sort(first_samples[first_unit_index == u]) for u in first_units]
    copied = np.zeros(unit_index.size, dtype=bool)
    sources = {}
    for new in new_ids:
        mine = np.flatnonzero(unit_index == new)
        if mine.size == 0:
            continue
        for known, train in zip(first_units, first_trains):
            if train.size == 0:
                continue
            near = distance_to_nearest(train, samples[mine]) <= window
            chance = 1.0 - np.exp(-train.size * (2 * window + 1) / total_samples)
            fraction = float(near.mean())
            if fraction >= max(COPY_MIN_FRACTION, COPY_CHANCE_FACTOR * chance):
                copied[mine[near]] = True
                sources.setdefault(int(new), []).append((int(known), fraction))
    return copied, sources


def judge_copies(unit_index, ids, copied, min_spikes):
    """(unit, spikes, copied spikes, kept?) for each of ``ids``: a unit stays when at least ``min_spikes`` of its
    spikes copy no other unit's and at most ``MAX_COPIED_FRACTION`` of them do."""
    verdicts = []
    for unit in ids:
        mine = unit_index == unit
        total, num_copied = int(mine.sum()), int(copied[mine].sum())
        keep = total - num_copied >= min_spikes and num_copied <= MAX_COPIED_FRACTION * total
        verdicts.append((int(unit), total, num_copied, keep))
    return verdicts


def match_with_discovered(recording, templates, discovered, first_pass, noise_levels, params, job_kwargs, window,
                          protected=(), log=None):
    """Second matching pass with the discovered units that are not copies of a known unit.

    The spikes of a kept discovered unit that copy a known unit's (``find_copies``) are removed.

    Returns (spikes, the discovered units kept, the templates matched: known and kept), or
    (``first_pass``, ``None``, ``templates``) when none is kept. Copies are removed and the pass is run again
    without them, up to ``MAX_PASSES`` times; with none left the first pass stands as it was. The kept
    units are numbered on from the first discovered unit id.
    """
    from .matching import match_spikes, with_units
    from .sorting_tools import global_sample_index

    first_id = int(np.asarray(discovered.unit_ids)[0])
    first_samples, _ = global_sample_index(first_pass, recording)
    min_spikes = MIN_SPIKES_FACTOR * params["min_cluster_size"]
    for _ in range(MAX_PASSES):
        joined = with_units(templates, discovered, noise_levels, params)
        spikes = match_spikes(recording, joined, noise_levels, params, job_kwargs)
        samples, total_samples = global_sample_index(spikes, recording)
        copied, sources = find_copies(spikes["unit_index"], samples, first_pass["unit_index"], first_samples,
                                      discovered.unit_ids, window, total_samples, protected)
        dropped = []
        for new, total, num_copied, keep in judge_copies(spikes["unit_index"], discovered.unit_ids, copied, min_spikes):
            if not keep:
                dropped.append(new)
            if log is not None and num_copied:
                what = "dropped" if not keep else f"kept, {num_copied} copied spikes removed"
                copies_of = ", ".join(f"{fraction:.0%} with unit {known}" for known, fraction in sources[new])
                log(f"discovered unit {new} {what}: of its {total} spikes {num_copied} copy a known unit's ({copies_of})")
        if not dropped:
            return spikes[~copied], discovered, joined
        kept = np.setdiff1d(discovered.unit_ids, dropped)
        if kept.size == 0:
            return first_pass, None, templates
        discovered = templates_of(discovered, kept, first_id)
    # copies left after the last pass: the pass with them is not trusted
    return first_pass, None, templates


@dataclasses.dataclass
class SmallUnits:
    """Units found on the residual too small for template matching: templates (ids from 0) and spikes."""

    templates: object
    spikes: np.ndarray


def keep_small_units(recording, spikes, small, first_unit_id, window, params, protected=(), log=None):
    """``spikes`` with the small units' spikes that copy no other unit's, and the small units kept (or ``None``).

    A small unit's spike that sits on a spike of a unit it meets far more often than chance
    (``find_copies``) is the remnant of that unit's subtraction and is removed; a small unit with fewer
    than ``MIN_SPIKES_FACTOR * min_cluster_size`` spikes left, or more than ``MAX_COPIED_FRACTION`` of them
    removed, is no unit.
    The kept units are numbered from ``first_unit_id``.
    """
    from .sorting_tools import global_sample_index

    samples, total_samples = global_sample_index(spikes, recording)
    small_samples, _ = global_sample_index(small.spikes, recording)
    ids = np.asarray(small.templates.unit_ids)
    copied, sources = find_copies(small.spikes["unit_index"], small_samples, spikes["unit_index"], samples, ids,
                                  window, total_samples, protected)
    min_spikes = MIN_SPIKES_FACTOR * params["min_cluster_size"]
    kept = []
    for unit, total, num_copied, keep in judge_copies(small.spikes["unit_index"], ids, copied, min_spikes):
        if keep:
            kept.append(unit)
        elif log is not None:
            log(f"small unit {unit} dropped: {total - num_copied} of its {total} residual spikes copy no other unit's")
    if not kept:
        return spikes, None
    chosen = np.isin(small.spikes["unit_index"], kept) & ~copied
    added = small.spikes[chosen]
    added["unit_index"] = first_unit_id + np.searchsorted(kept, added["unit_index"])
    if log is not None:
        log(f"{len(kept)} small units found on the residual keep {added.size} spikes ({int(copied.sum())} "
            f"copies of other units' spikes removed)")
    return time_ordered(spikes, added), templates_of(small.templates, kept, first_unit_id)


def matched_filter_on_chunks(recording, templates_array, seed, num_chunks=20, chunk_seconds=1.0):
    """(correlations, slices): each template's correlation with ``recording`` on ``num_chunks`` random chunks of
    ``chunk_seconds``, one array per chunk (a list per template), and each chunk's (segment, start, end).
    ``templates_array``: (units, samples, channels)."""
    from spikeinterface.core.recording_tools import get_random_sample_slices

    from .matching import matched_filter

    slices = get_random_sample_slices(recording, num_chunks_per_segment=num_chunks,
                                      chunk_size=int(chunk_seconds * recording.sampling_frequency), seed=seed)
    chunks = [recording.get_traces(segment_index=seg, start_frame=start, end_frame=end)
              for seg, start, end in slices]
    correlations = []
    for template in templates_array:
        channels = np.flatnonzero(np.abs(template).max(axis=0) > 0)
        correlations.append([matched_filter(chunk[:, channels].astype("float64"), template[:, channels])
                             for chunk in chunks])
    return correlations, slices


def near_found_spikes(slices, spikes, nbefore, window) -> list:
    """For each chunk (``slices``: (segment, start, end)), True at each position of a template's correlation
    (the template laid from that sample on) that puts the template's peak within ``window`` samples of a
    spike of ``spikes``."""
    from .sorting_tools import distance_to_nearest

    busy = []
    for seg, start, end in slices:
        laid = np.sort(spikes["sample_index"][spikes["segment_index"] == seg].astype("int64")) - nbefore
        busy.append(distance_to_nearest(laid, np.arange(start, end)) <= window)
    return busy


def robust_spread(values) -> float:
    """Standard deviation from the median absolute deviation: the matched filter's noise, the few spikes aside."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def peaks_over(correlation_chunks, height, distance, busy=None) -> int:
    """How many peaks at least ``distance`` samples apart reach ``height``, over all chunks, leaving out those
    where ``busy`` (one boolean array per chunk, or None) is True."""
    from scipy.signal import find_peaks

    total = 0
    for at, values in enumerate(correlation_chunks):
        peaks = find_peaks(values, height=height, distance=distance)[0]
        total += peaks.size if busy is None else int((~busy[at][:values.size][peaks]).sum())
    return total


def small_template_bars(correlations, energy, wobble_threshold, distance, busy=None):
    """(bar on <t, x> for each template, its peaks over that bar, the sign-flipped template's peaks over it).

    ``correlations``: each template's correlation with the residual on random chunks
    (``matched_filter_on_chunks``); ``energy``: each template's |t|^2. A fit is kept where <t, x> reaches
    ``SMALL_TEMPLATE_MIN_SCALE`` |t|^2 and ``SMALL_TEMPLATE_MIN_Z`` spreads of that correlation, where the
    residual holds more of the template's spikes than noise crossings (``SMALL_TEMPLATE_MIN_EXCESS``);
    elsewhere where wobble's own score, 2<t, x> - |t|^2, clears ``wobble_threshold``. Peaks are counted at
    least ``distance`` samples apart, and only where ``busy`` (``near_found_spikes``; None: everywhere) is False:
    where a spike was subtracted the residual holds what its fit left, not noise.
    """
    spread = np.array([robust_spread(np.concatenate(chunks)) for chunks in correlations])
    needed = np.maximum(SMALL_TEMPLATE_MIN_SCALE * energy, SMALL_TEMPLATE_MIN_Z * spread)
    over = np.array([peaks_over(chunks, bar, distance, busy) for chunks, bar in zip(correlations, needed)])
    flipped = np.array([peaks_over([-values for values in chunks], bar, distance, busy)
                        for chunks, bar in zip(correlations, needed)])
    confirmed = over >= SMALL_TEMPLATE_MIN_EXCESS * np.maximum(flipped, 1)  # a flipped count of 0 counts as 1
    return np.where(confirmed, needed, np.maximum(needed, (energy + wobble_threshold) / 2)), over, flipped


def match_small_templates(recording, templates, spikes, noise_levels, params, job_kwargs, window, protected=(),
                          log=None):
    """``spikes`` with the spikes that wobble finds on their residual for the units of small templates, and how many.

    A small unit (``keep_small_units``) holds only the residual peaks the matched filter found; it never
    goes through template matching (dense-overlap seed 2002: GT 16, 2.3 noise levels after whitening
    and spread thin over many channels, was three small units holding 30 % of its spikes). Once every
    spike found so far is subtracted, the templates whose peak is under ``SMALL_TEMPLATE_MAX_SNR``
    noise levels are matched on what is left by SpikeInterface's wobble (lupin's engine), which scores the
    fit of the whole template, with every other template wobble can see competing at wobble's own threshold
    (where matching left a big neuron's spike whole, a small template alone would take it); only the small
    templates' spikes are kept. A found spike within ``window`` samples of its unit's own is
    a repeat; one that copies another unit's spikes (``find_copies``) is the remnant of an imperfect
    subtraction that a small template happens to fit. Both are dropped. ``protected`` (curated) units
    are not matched here: their own search follows.

    Wobble's own threshold (50 on 2<t, x> - |t|^2, in the traces' units) asks the faintest templates for
    spikes above their own size; each template is held instead to its own bar: <t, x> at least
    ``SMALL_TEMPLATE_MIN_SCALE`` |t|^2 and ``SMALL_TEMPLATE_MIN_Z`` times the spread of its correlation
    with the residual, where that correlation peaks over this bar ``SMALL_TEMPLATE_MIN_EXCESS`` times as
    often as the sign-flipped template's (on random chunks, ``matched_filter_on_chunks``, away from the spikes
    found so far, ``near_found_spikes``); elsewhere to wobble's own threshold.
    """
    from spikeinterface.sortingcomponents.matching.wobble import WobbleParameters

    from .matching import match_spikes, residual_of_matching, template_correlations, visible_to_wobble
    from .overlaps import refractory_repeats
    from .sorting_tools import global_sample_index

    ids = np.asarray(templates.unit_ids)
    dense = templates.get_dense_templates()
    peak = (np.abs(dense).max(axis=1) / noise_levels[None, :]).max(axis=1)
    # here too, so that a template wobble cannot see sets no bar for the others
    small = ids[(peak < SMALL_TEMPLATE_MAX_SNR) & visible_to_wobble(dense) & ~np.isin(ids, protected)]
    if small.size == 0:
        return spikes, 0
    residual = residual_of_matching(recording, templates, spikes)
    # every template wobble can see competes, so that what matching left of a big neuron's spike (or a spike it
    # missed) goes to that neuron's template, held to wobble's own threshold, and not to a small template that
    # fits part of it; only the small templates' spikes are kept
    competing = ids[visible_to_wobble(dense) & ~np.isin(ids, protected)]
    chosen = templates.select_units(competing)
    dense = chosen.get_dense_templates()
    energy = (dense ** 2).sum(axis=(1, 2))
    is_small = np.isin(competing, small)
    correlations, slices = matched_filter_on_chunks(residual, dense[is_small], params["seed"])
    small_needed, over, flipped = small_template_bars(correlations, energy[is_small], WobbleParameters().threshold,
                                                      window, busy=near_found_spikes(slices, spikes, chosen.nbefore,
                                                                                     window))
    needed = (energy + WobbleParameters().threshold) / 2
    needed[is_small] = small_needed
    # wobble runs once, at the lowest of these bars, to let the templates compete for each spike, and
    # each spike is then held to its own template's bar
    loosest = float(np.min(2 * needed - energy))
    found = match_spikes(residual, chosen, noise_levels, dict(params, matching_method="wobble"), job_kwargs,
                         method_kwargs=dict(parameters=dict(threshold=loosest)))
    row = np.searchsorted(competing, found["unit_index"])
    found = found[template_correlations(residual, chosen, found) >= (1 - SUBSAMPLE_LOSS) * needed[row]]
    taken_by_big = int((~np.isin(found["unit_index"], small)).sum())
    found = found[np.isin(found["unit_index"], small)]
    fitted = found.size
    # wobble's amplitude is the trace on the spike's best channel, often outside the small template's
    # channels: a spike found here is taken at its template's scale
    found["amplitude"] = 1.0
    samples, total_samples = global_sample_index(spikes, recording)
    found_samples, _ = global_sample_index(found, recording)
    repeat = refractory_repeats(found_samples, found["unit_index"], samples, spikes["unit_index"], window)
    copied, _ = find_copies(found["unit_index"], found_samples, spikes["unit_index"], samples, small, window,
                            total_samples, protected)
    added = found[~repeat & ~copied]
    if log is not None:
        log(f"small-template matching: wobble on the residual with the {small.size} templates under "
            f"{SMALL_TEMPLATE_MAX_SNR:g} noise levels, the {competing.size - small.size} others competing "
            f"(bars <t, x> >= {np.round(small_needed / energy[is_small], 2).tolist()} |t|^2; "
            f"peaks over them on random chunks of the residual, away from found spikes, {over.tolist()}, of the "
            f"flipped templates {flipped.tolist()}) "
            f"{taken_by_big} spikes taken by the others, {fitted} by the small templates over their bar, "
            f"{int(repeat.sum())} repeats of their unit's and {int((copied & ~repeat).sum())} copies of another "
            f"unit's dropped, {added.size} added")
    return time_ordered(spikes, added), added.size
