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
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy

import numpy as np

from .detect import detect_spikes, spike_prototype

# SVD features as lupin takes them for clustering (SpikeInterface 0.105 defaults of the sorter)
FEATURE_MS_BEFORE = 0.3
FEATURE_MS_AFTER = 1.3
FEATURE_RADIUS_UM = 120.0
FEATURE_COMPONENTS = 5
SPLIT_PCA_FEATURES = 4
# lupin's template cleaning inside the clustering: templates below 4 noise levels peak-to-peak, or
# whose peak sits more than 0.2 ms off the spike time, are noise or parts of collisions
CLEAN_MIN_SNR = 4.0
CLEAN_MAX_JITTER_MS = 0.2
CLEAN_SPARSIFY_THRESHOLD = 1.0
# a new unit needs at least this many residual spikes: noise clusters had 2-30 on low-snr
MIN_SPIKES_FACTOR = 2
# a discovered unit whose spikes were mostly one known unit's in the first matching pass is that unit
MAX_TAKEN_FRACTION = 0.5
# second passes run to drop copies before discovery gives up and keeps the first pass
MAX_PASSES = 3


def cluster_residual_peaks(residual, peaks, noise_levels, min_firing_rate, seed, job_kwargs):
    """Cluster labels (-1 = none) of the residual's peaks by SpikeInterface's iterative isosplit."""
    from spikeinterface.sortingcomponents.clustering import find_clusters_from_peaks
    from spikeinterface.sortingcomponents.clustering.method_list import clustering_methods

    kwargs = deepcopy(clustering_methods["iterative-isosplit"]._default_params)
    kwargs["peaks_svd"].update(ms_before=FEATURE_MS_BEFORE, ms_after=FEATURE_MS_AFTER, radius_um=FEATURE_RADIUS_UM,
                               n_components=FEATURE_COMPONENTS)
    kwargs["split"]["method_kwargs"]["n_pca_features"] = SPLIT_PCA_FEATURES
    kwargs["clean_templates"].update(min_snr=CLEAN_MIN_SNR, max_jitter_ms=CLEAN_MAX_JITTER_MS,
                                     sparsify_threshold=CLEAN_SPARSIFY_THRESHOLD)
    kwargs["clean_low_firing"]["min_firing_rate"] = min_firing_rate
    kwargs.update(noise_levels=noise_levels, seed=seed, verbose=False)
    _, labels = find_clusters_from_peaks(residual, peaks, method="iterative-isosplit", method_kwargs=kwargs,
                                         job_kwargs=job_kwargs)
    return np.asarray(labels, dtype="int64")


def discover_units(recording, templates, spikes, noise_levels, params, job_kwargs, first_unit_id, log=None):
    """Templates of the units found on the residual of matching (``None`` when there is none).

    ``templates`` and ``spikes`` are the first matching pass; the new units get ids from
    ``first_unit_id`` on. A cluster becomes a unit when it has at least
    ``MIN_SPIKES_FACTOR * min_cluster_size`` spikes and its template's peak-to-peak reaches
    ``discover_min_snr`` noise levels on its best channel.
    """
    from spikeinterface.core import Templates

    from .matching import residual_of_matching, unit_templates

    residual = residual_of_matching(recording, templates, spikes)
    matched_filter = dict(params, detect_method="matched_filtering")
    prototype = spike_prototype(recording, noise_levels, matched_filter, job_kwargs)
    peaks = detect_spikes(residual, noise_levels, params, job_kwargs, prototype)
    min_spikes = MIN_SPIKES_FACTOR * params["min_cluster_size"]
    if peaks.size < min_spikes:
        if log is not None:
            log(f"discovery: {peaks.size} peaks on the residual of matching, too few to cluster")
        return None
    labels = cluster_residual_peaks(residual, peaks, noise_levels, params["min_firing_rate"], params["seed"],
                                    job_kwargs)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, dtype="int64")
    big = np.flatnonzero(sizes >= min_spikes)
    renumber = np.full(sizes.size + 1, -1, dtype="int64")  # the last entry maps -1 to -1
    renumber[big] = np.arange(big.size)
    labels = renumber[labels]
    if big.size == 0:
        if log is not None:
            log(f"discovery: {peaks.size} peaks on the residual, no cluster of {min_spikes} spikes")
        return None
    found = unit_templates(residual, peaks, labels, big.size, noise_levels, params, job_kwargs)
    dense = found.get_dense_templates()
    noise = np.median(noise_levels[np.isfinite(noise_levels)])
    snr = np.ptp(dense, axis=1).max(axis=1) / noise
    kept = snr >= params["discover_min_snr"]
    if log is not None:
        log(f"discovery: {peaks.size} peaks on the residual of matching, {big.size} clusters of >= {min_spikes} "
            f"spikes, {int(kept.sum())} kept as new units (template SNR {np.round(np.sort(snr)[::-1], 1).tolist()})")
    if not kept.any():
        return None
    return Templates(templates_array=dense[kept], sampling_frequency=found.sampling_frequency, nbefore=found.nbefore,
                     channel_ids=found.channel_ids, unit_ids=first_unit_id + np.arange(int(kept.sum())),
                     probe=found.probe, is_in_uV=found.is_in_uV)


def find_copies(unit_index, samples, first_unit_index, first_samples, new_ids, window, protected=()):
    """The discovered units (of ``new_ids``) that are copies of a known unit, as {discovered: known}.

    A discovered unit is new when its spikes are new: they were on the residual because the first
    pass had no template for them. When at least ``MAX_TAKEN_FRACTION`` of its spikes in the second pass
    lie within ``window`` samples of the first pass's spikes of one known unit, it is a copy of that
    unit (the remnant of an imperfect subtraction, or spikes the first pass missed). Joined to the
    known unit, such copies brought 31-38 % foreign spikes into two tetrode units (precision
    1.00 -> 0.65). ``protected`` (curated) units are not looked at.
    """
    from .sorting_tools import distance_to_nearest

    first_units = np.setdiff1d(np.unique(first_unit_index), protected)
    first_trains = [np.sort(first_samples[first_unit_index == u]) for u in first_units]
    copies = {}
    for new in new_ids:
        mine = samples[unit_index == new]
        if mine.size == 0 or first_units.size == 0:
            continue
        taken = np.array([np.mean(distance_to_nearest(train, mine) <= window) for train in first_trains])
        if taken.max() >= MAX_TAKEN_FRACTION:
            copies[int(new)] = (int(first_units[taken.argmax()]), float(taken.max()))
    return copies


def match_with_discovered(recording, templates, discovered, first_pass, noise_levels, params, job_kwargs, window,
                          protected=(), log=None):
    """Second matching pass with the discovered units that are not copies of a known unit.

    Returns (spikes, the discovered units kept, the templates matched: known and kept), or
    (``first_pass``, ``None``, ``templates``) when none is kept. Copies are removed and the pass is run again
    without them, up to ``MAX_PASSES`` times; with none left the first pass stands as it was. The kept
    units are numbered on from the first discovered unit id.
    """
    from .matching import match_spikes, with_units
    from .sorting_tools import global_sample_index

    first_id = int(np.asarray(discovered.unit_ids)[0])
    first_samples, _ = global_sample_index(first_pass, recording)
    for _ in range(MAX_PASSES):
        joined = with_units(templates, discovered, noise_levels, params)
        spikes = match_spikes(recording, joined, noise_levels, params, job_kwargs)
        samples, _ = global_sample_index(spikes, recording)
        copies = find_copies(spikes["unit_index"], samples, first_pass["unit_index"], first_samples,
                             discovered.unit_ids, window, protected)
        if log is not None:
            for new, (known, fraction) in copies.items():
                log(f"discovered unit {new} dropped: {fraction:.0%} of its spikes were unit {known}'s in the first pass")
        if not copies:
            return spikes, discovered, joined
        kept = np.setdiff1d(discovered.unit_ids, list(copies))
        if kept.size == 0:
            return first_pass, None, templates
        discovered = dataclasses.replace(discovered.select_units(kept), unit_ids=first_id + np.arange(kept.size))
    # copies left after the last pass: the pass with them is not trusted
    return first_pass, None, templates
