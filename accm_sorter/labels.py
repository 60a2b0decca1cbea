"""Curated labels: a partial sorting whose units are taken as known examples.

Labs curate a few units by hand (phy) or carry them over from a previous session. Their spikes
become labelled examples: the encoder gets a supervised contrastive term on them, the pairwise
classifier learns from their true same/different pairs, and the labelled units come out of the
sorting with exactly their labelled spikes (plus the ones accm finds that the curator missed).
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


def attach_labels(peaks, labels: Labels, sampling_frequency: float):
    """Label each detected peak (-1 = unlabelled); add peaks for labelled spikes detection missed.

    A labelled spike matches the nearest detected peak within 0.4 ms, which then takes the
    labelled spike's time. Spikes the detector missed are added on their unit's most common main
    channel, so that labelled units come out intact.
    Returns (peaks, peak_unit_index).
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
        # the curator's spike time wins over the detector's
        peaks["sample_index"][in_seg[pick[close]]] = labels.sample_index[mine[close]]
        matched[mine[close]] = True
    missing = np.flatnonzero(~matched)
    if missing.size:
        extra = np.zeros(missing.size, dtype=peaks.dtype)
        extra["sample_index"] = labels.sample_index[missing]
        extra["segment_index"] = labels.segment_index[missing]
        for k in np.unique(labels.unit_index[missing]):
            chans = peaks["channel_index"][peak_labels == k]
            main = np.bincount(chans).argmax() if chans.size else 0
            extra["channel_index"][labels.unit_index[missing] == k] = main
        peaks = np.concatenate([peaks, extra])
        peak_labels = np.concatenate([peak_labels, labels.unit_index[missing]])
    order = np.lexsort((peaks["sample_index"], peaks["segment_index"]))
    return peaks[order], peak_labels[order]


def combine_clusters_with_labels(cluster_labels, cluster_features, labelled_features, labelled_units,
                                 num_labelled_units: int, min_share: float = 0.5):
    """Put HDBSCAN clusters and labelled units in one label space: labelled units 0..L-1 first.

    Each labelled spike that lies inside an HDBSCAN cluster (within the distance from its centroid
    that holds 90% of its members) votes for it. A cluster most of whose votes come
    from one labelled unit is that unit (its members join it); a cluster that two labelled units
    share substantially mixes them and is dropped (its spikes are re-assigned later by the
    classifier, which has the labelled examples of both). Other clusters are kept after the
    labelled units. Returns (joint labels for the clustered spikes, number of joint labels).
    """
    import torch

    num_clusters = int(cluster_labels.max()) + 1 if cluster_labels.size and cluster_labels.max() >= 0 else 0
    owner = np.full(num_clusters, -2, dtype="int64")  # -2 unowned, -1 dropped, k >= 0 labelled unit
    if num_clusters:
        centroids = np.stack([np.median(cluster_features[cluster_labels == c], axis=0) for c in range(num_clusters)])
        # a cluster's reach: 90% of its own members lie this close to its centroid
        radius = np.array([np.percentile(np.linalg.norm(cluster_features[cluster_labels == c] - centroids[c], axis=1),
                                         90) for c in range(num_clusters)])
        dist = torch.cdist(torch.as_tensor(labelled_features), torch.as_tensor(centroids)).numpy()
        nearest = dist.argmin(axis=1)
        # a labelled spike votes only from inside a cluster: one far from every cluster (a unit near the
        # noise floor) must not hand a real neuron's cluster to its unit
        inside = dist[np.arange(nearest.size), nearest] <= radius[nearest]
        votes = np.zeros((num_labelled_units, num_clusters))
        np.add.at(votes, (labelled_units[inside], nearest[inside]), 1)
        for c in range(num_clusters):
            total = votes[:, c].sum()
            if total == 0:
                continue
            shares = votes[:, c] / total
            top = int(np.argmax(shares))
            # a unit's votes spread over its own clusters: count a cluster as the unit's when the unit sends it
            # a real part of its labelled spikes
            significant = votes[:, c] >= 0.1 * np.maximum(votes.sum(axis=1), 1)
            if shares[top] >= min_share and significant[top] and significant.sum() == 1:
                owner[c] = top
            elif significant.sum() >= 2:
                owner[c] = -1
    kept = np.flatnonzero(owner == -2)
    new_id = np.full(num_clusters, -1, dtype="int64")
    new_id[kept] = num_labelled_units + np.arange(kept.size)
    absorbed = owner >= 0
    new_id[absorbed] = owner[absorbed]
    joint = np.where(cluster_labels >= 0, new_id[np.clip(cluster_labels, 0, None)], -1)
    return joint, num_labelled_units + kept.size
