"""Stage 8: final clean-up of the assigned spikes.

A spike detected twice (two peaks of one waveform, or two contacts beyond the detection radius)
ends in the same unit twice within a fraction of a millisecond: keep the one the classifier is
surer of. Units firing below ``min_firing_rate`` are dropped as noise.
"""

from __future__ import annotations

import numpy as np


def remove_duplicate_spikes(labels, global_samples, confidence, censor_samples: int) -> np.ndarray:
    """Return labels with within-unit duplicates (closer than ``censor_samples``) set to -1."""
    labels = labels.copy()
    assigned = np.flatnonzero(labels >= 0)
    order = assigned[np.lexsort((global_samples[assigned], labels[assigned]))]
    while True:
        same_unit = labels[order[1:]] == labels[order[:-1]]
        close = (global_samples[order[1:]] - global_samples[order[:-1]]) < censor_samples
        clash = np.flatnonzero(same_unit & close)
        if clash.size == 0:
            return labels
        first, second = order[clash], order[clash + 1]
        loser = np.where(confidence[first] >= confidence[second], second, first)
        labels[np.unique(loser)] = -1
        order = order[labels[order] >= 0]


def remove_rare_units(labels, total_duration_s: float, min_firing_rate: float, protected=()) -> np.ndarray:
    """Drop units below ``min_firing_rate`` and renumber the rest 0..n-1 (in unit order).

    ``protected`` units (a curator's) stay whenever they have a spike.
    """
    if labels.size == 0 or labels.max() < 0:
        return labels
    counts = np.bincount(labels[labels >= 0])
    keep = counts >= max(1.0, min_firing_rate * total_duration_s)
    protected = np.asarray(protected, dtype="int64")
    protected = protected[protected < counts.size]
    keep[protected] |= counts[protected] > 0
    new_ids = np.cumsum(keep) - 1
    return np.where((labels >= 0) & keep[np.clip(labels, 0, None)], new_ids[np.clip(labels, 0, None)], -1)
