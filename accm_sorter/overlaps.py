"""Stage 8: overlapping-spike resolution by peeling.

When two spikes overlap in time on shared channels, each snippet carries part of the other
spike, so its embedding drifts towards neither unit. For every spike with a neighbour within the
snippet window, the neighbour's unit template (scaled to the neighbour's own amplitude, shifted
to its lag) is subtracted from the snippet; the residual is embedded again and re-assigned by the
pairwise classifier. The new assignment replaces the old one when the classifier is surer of it.
"""

from __future__ import annotations

import numpy as np


def find_overlapping_pairs(global_samples, main_channels, labels, channel_distances, max_lag: int,
                           radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index pairs with |t_i - t_j| <= max_lag, main channels within radius, j assigned."""
    from .sorting_tools import close_positions

    order = np.argsort(global_samples, kind="stable")
    firsts, seconds = [], []
    for offset, close in close_positions(global_samples[order], max_lag, max_step=63):
        a, b = order[close], order[close + offset]
        firsts += [a, b]
        seconds += [b, a]
    if not firsts:
        return np.zeros(0, "int64"), np.zeros(0, "int64")
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    keep = (labels[j] >= 0) & (channel_distances[main_channels[i], main_channels[j]] <= radius_um)
    return i[keep], j[keep]


def template_amplitude_scale(snippets, templates, labels, main_channels, channel_table, index):
    """Least-squares scale of each spike against its unit's template on its own local channels."""
    local = templates[labels[index][:, None], channel_table[main_channels[index]]]  # (n, K, T)
    x = snippets[index]
    num = (x * local).sum(axis=(1, 2))
    den = (local * local).sum(axis=(1, 2))
    return np.clip(num / np.maximum(den, 1e-9), 0.5, 2.0).astype("float32")


def peel_neighbours(snippets, templates, labels, main_channels, channel_table, global_samples, pairs, nbefore):
    """Return (spike indices, residual snippets) with every neighbour's scaled template removed."""
    first, second = pairs
    if first.size == 0:
        return np.zeros(0, "int64"), np.zeros((0,) + snippets.shape[1:], "float32")
    num_samples = snippets.shape[2]
    scale = template_amplitude_scale(snippets, templates, labels, main_channels, channel_table, second)
    lag = (global_samples[second] - global_samples[first]).astype("int64")
    # the neighbour's template on the *first* spike's local channels, moved by the lag
    local = templates[labels[second][:, None], channel_table[main_channels[first]]]  # (p, K, T)
    source = np.arange(num_samples)[None, :] - lag[:, None]  # (p, T)
    valid = (source >= 0) & (source < num_samples)
    shifted = np.take_along_axis(local, np.clip(source, 0, num_samples - 1)[:, None, :], axis=2)
    shifted *= valid[:, None, :] * scale[:, None, None]
    spikes, inverse = np.unique(first, return_inverse=True)
    residuals = snippets[spikes].copy()
    np.subtract.at(residuals, inverse, shifted)
    return spikes, residuals


def resolve_overlaps(snippets, templates, labels, confidence, main_channels, channel_table, global_samples,
                     channel_distances, nbefore, max_lag, radius_um, reassign):
    """Re-assign overlapped spikes from their peeled residuals; return new labels, confidence, report.

    ``reassign(spike_indices, residual_snippets) -> (labels, confidence)`` embeds the residuals
    and asks the pairwise classifier; it is passed in so this stage does not reach back up the
    pipeline.
    """
    pairs = find_overlapping_pairs(global_samples, main_channels, labels, channel_distances, max_lag, radius_um)
    spikes, residuals = peel_neighbours(snippets, templates, labels, main_channels, channel_table, global_samples,
                                        pairs, nbefore)
    labels, confidence = labels.copy(), confidence.copy()
    report = dict(overlapping_spikes=int(spikes.size), reassigned=0, recovered=0)
    if spikes.size == 0:
        return labels, confidence, report
    new_labels, new_confidence = reassign(spikes, residuals)
    better = (new_labels >= 0) & (new_confidence > confidence[spikes])
    changed = better & (new_labels != labels[spikes])
    report["reassigned"] = int((changed & (labels[spikes] >= 0)).sum())
    report["recovered"] = int((changed & (labels[spikes] < 0)).sum())
    labels[spikes[better]] = new_labels[better]
    confidence[spikes[better]] = new_confidence[better]
    return labels, confidence, report


def residual_recording(recording, templates, nbefore, peaks, labels, scales):
    """``recording`` minus every assigned spike's scaled unit template (lazy, chunked).

    Built from SpikeInterface's ``InjectTemplatesRecording`` with negative amplitude factors:
    the same machinery that generates ground truth, run backwards.
    """
    from spikeinterface.core import NumpySorting
    from spikeinterface.core.base import minimum_spike_dtype
    from spikeinterface.core.generate import InjectTemplatesRecording

    from .sorting_tools import with_all_segments

    assigned = np.flatnonzero(labels >= 0)
    spikes = np.zeros(assigned.size, dtype=minimum_spike_dtype)
    spikes["sample_index"] = peaks["sample_index"][assigned]
    spikes["unit_index"] = labels[assigned]
    spikes["segment_index"] = peaks["segment_index"][assigned]
    order = np.lexsort((spikes["unit_index"], spikes["sample_index"], spikes["segment_index"]))
    sorting = with_all_segments(NumpySorting(spikes[order], recording.sampling_frequency, np.arange(templates.shape[0])),
                                recording.get_num_segments())
    dense = np.ascontiguousarray(np.transpose(templates, (0, 2, 1))).astype("float32")  # (units, T, channels)
    return InjectTemplatesRecording(sorting, dense, nbefore=nbefore, amplitude_factor=-scales[assigned][order],
                                    parent_recording=recording)


def refractory_repeats(new_samples, new_labels, old_samples, old_labels, window: int) -> np.ndarray:
    """True where a recovered spike's unit already fired within ``window`` samples.

    A neuron cannot fire twice that fast, so such a spike is what was left of an existing spike
    after subtracting its template, not a spike that another one had masked.
    """
    from .sorting_tools import distance_to_nearest

    repeat = np.zeros(new_samples.size, dtype=bool)
    for unit in np.unique(new_labels[new_labels >= 0]):
        mine = np.flatnonzero(new_labels == unit)
        repeat[mine] = distance_to_nearest(np.sort(old_samples[old_labels == unit]), new_samples[mine]) <= window
    return repeat
