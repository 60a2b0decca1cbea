"""Curated labels: a partial sorting whose units are taken as known examples.

Labs curate a few units by hand (phy) or carry them over from a previous session. This module
reads and checks them and finds which detected peaks they label; ``curated.py`` lays the curated
units over the sorting, and with ``labels_weight`` > 0 the encoder also gets a supervised
contrastive term on the labelled spikes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATCH_TOLERANCE_MS = 0.4


class LabelsError(ValueError):
    """The labels cannot be used with this recording; the message says why and what to do."""


@dataclass
class Labels:
    unit_ids: np.ndarray  # original unit ids, one per labelled unit
    segment_index: np.ndarray  # per labelled spike
    sample_index: np.ndarray
    unit_index: np.ndarray  # index into unit_ids


def load_label_sorting(path):
    """Open a SpikeInterface sorting folder/JSON or a phy folder (noise clusters excluded)."""
    import spikeinterface.core as sc

    p = Path(path)
    if not p.exists():
        raise LabelsError(f"labels={str(path)!r} does not exist: give a saved sorting folder or a phy folder.")
    if p.is_dir() and (p / "params.py").exists() and (p / "spike_times.npy").exists():
        import spikeinterface.extractors as se

        return se.read_phy(p, exclude_cluster_groups=["noise"])
    try:
        return sc.load(p)
    except Exception as err:
        raise LabelsError(
            f"labels={str(path)!r} is neither a SpikeInterface sorting (sorting.save(folder=...)) nor a phy folder "
            f"({type(err).__name__}: {str(err)[:200]})."
        ) from err


def check_labels(sorting, recording) -> Labels:
    """Validate a label sorting against the recording and flatten it; raise LabelsError with the fix."""
    from spikeinterface.core import BaseSorting

    if not isinstance(sorting, BaseSorting):
        raise LabelsError(f"labels must be a sorting, got {type(sorting).__name__}.")
    if abs(sorting.sampling_frequency - recording.sampling_frequency) > 1e-6:
        raise LabelsError(
            f"The labels were made at {sorting.sampling_frequency} Hz but the recording is "
            f"{recording.sampling_frequency} Hz: labels must come from this recording."
        )
    if sorting.get_num_segments() != recording.get_num_segments():
        raise LabelsError(
            f"The labels have {sorting.get_num_segments()} segment(s), the recording "
            f"{recording.get_num_segments()}: they must come from this recording."
        )
    for key in ("main_channel_id", "ch", "channel_id"):
        if key in sorting.get_property_keys():
            named = set(np.asarray(sorting.get_property(key)).tolist())
            known = set(np.asarray(recording.channel_ids).tolist())
            if key == "ch":  # phy stores channel *indices*
                known = set(range(recording.get_num_channels()))
            unknown = sorted(named - known, key=str)
            if unknown:
                raise LabelsError(
                    f"The labels name channel(s) {unknown[:10]} (property '{key}') that this recording does not have: "
                    "they were curated on another recording or channel map."
                )
    segments, samples, units = [], [], []
    for seg in range(sorting.get_num_segments()):
        n = recording.get_num_samples(seg)
        for k, unit in enumerate(sorting.unit_ids):
            train = np.asarray(sorting.get_unit_spike_train(unit, segment_index=seg), dtype="int64")
            if train.size and (train.min() < 0 or train.max() >= n):
                raise LabelsError(
                    f"Labelled unit {unit} has spikes at samples {int(train.min())}..{int(train.max())}, beyond the "
                    f"recording's segment {seg} (0..{n - 1}): the labels do not belong to this recording."
                )
            segments.append(np.full(train.size, seg))
            samples.append(train)
            units.append(np.full(train.size, k))
    if sorting.get_num_units() == 0 or sum(s.size for s in samples) == 0:
        raise LabelsError("The labels contain no spike: curate at least one unit, or leave labels unset.")
    return Labels(np.asarray(sorting.unit_ids), np.concatenate(segments).astype("int64"),
                  np.concatenate(samples).astype("int64"), np.concatenate(units).astype("int64"))


def label_peaks(peaks, labels: Labels, sampling_frequency: float):
    """Curated unit of each detected peak (-1 = unlabelled), and the labelled spikes no peak matches.

    A labelled spike matches the nearest detected peak within 0.4 ms. The peaks themselves are not
    touched, so every self-supervised stage sees what it would see without labels.
    Returns (peak_unit_index, indices of the unmatched labelled spikes).
    """
    tolerance = int(round(MATCH_TOLERANCE_MS * sampling_frequency / 1000))
    peak_labels = np.full(peaks.size, -1, dtype="int64")
    matched = np.zeros(labels.sample_index.size, dtype=bool)
    for seg in np.unique(labels.segment_index):
        in_seg = np.flatnonzero(peaks["segment_index"] == seg)
        times = peaks["sample_index"][in_seg]
        mine = np.flatnonzero(labels.segment_index == seg)
        if times.size == 0:
            continue
        pos = np.searchsorted(times, labels.sample_index[mine])
        left = np.clip(pos - 1, 0, times.size - 1)
        right = np.clip(pos, 0, times.size - 1)
        pick = np.where(np.abs(times[left] - labels.sample_index[mine]) <= np.abs(times[right] - labels.sample_index[mine]),
                        left, right)
        close = np.abs(times[pick] - labels.sample_index[mine]) <= tolerance
        peak_labels[in_seg[pick[close]]] = labels.unit_index[mine[close]]
        matched[mine[close]] = True
    missed = np.flatnonzero(~matched)
    # in time order: SpikeInterface's node pipeline reads peaks chunk by chunk
    return peak_labels, missed[np.lexsort((labels.sample_index[missed], labels.segment_index[missed]))]


def peaks_for_missed_labels(peaks, peak_labels, labels: Labels, missed):
    """Peaks for labelled spikes detection missed, on their unit's most common main channel.

    ``missed`` must be in time order (as ``label_peaks`` returns it); so are the peaks.
    """
    extra = np.zeros(missed.size, dtype=peaks.dtype)
    extra["sample_index"] = labels.sample_index[missed]
    extra["segment_index"] = labels.segment_index[missed]
    for k in np.unique(labels.unit_index[missed]):
        chans = peaks["channel_index"][peak_labels == k]
        extra["channel_index"][labels.unit_index[missed] == k] = np.bincount(chans).argmax() if chans.size else 0
    return extra
