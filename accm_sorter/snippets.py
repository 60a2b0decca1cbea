"""Stage 3: local multi-channel snippets with a fixed shape.

Every snippet holds ``num_local_channels`` channels: the spike's main channel first, then its
nearest neighbours ordered by distance (ties broken by depth, then x), so the encoder always sees
the same layout relative to the main channel. Extraction runs through SpikeInterface's node
pipeline, so it is chunked and parallel like detection.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.core.node_pipeline import PeakRetriever, WaveformsNode, run_node_pipeline, base_peak_dtype


def local_channel_table(channel_locations: np.ndarray, num_local_channels: int) -> np.ndarray:
    """(num_channels, k) channel indices: each row starts with the channel itself."""
    num_channels = channel_locations.shape[0]
    k = min(num_local_channels, num_channels)
    table = np.zeros((num_channels, k), dtype="int64")
    for c in range(num_channels):
        delta = channel_locations - channel_locations[c]
        dist = np.sqrt((delta**2).sum(axis=1))
        order = np.lexsort((delta[:, 0], delta[:, 1], np.round(dist, 3)))
        table[c] = order[:k]
    return table


class ExtractLocalSnippets(WaveformsNode):
    """Node that cuts (time, local channel) snippets around each peak."""

    def __init__(self, recording, nbefore, nafter, channel_table, parents=None, return_output=True):
        WaveformsNode.__init__(
            self, recording, parents=parents, nbefore=nbefore, nafter=nafter, return_output=return_output
        )
        self.channel_table = np.asarray(channel_table)
        self._kwargs.update(dict(nbefore=nbefore, nafter=nafter, channel_table=self.channel_table))

    def get_margin(self):
        return max(self.nbefore, self.nafter)

    def compute(self, traces, peaks):
        time_index = peaks["sample_index"][:, None] + np.arange(-self.nbefore, self.nafter)[None, :]
        channels = self.channel_table[peaks["channel_index"]]
        # fancy indexing: (n, 1, T) x (n, K, 1) -> (n, K, T), the layout the encoder takes, so the
        # gathered array needs no transposed copy (one snippet-sized array less at the peak)
        return traces[time_index[:, None, :], channels[:, :, None]].astype("float32", copy=False)


def extract_snippets(recording, peaks, channel_table, nbefore, nafter, job_kwargs) -> np.ndarray:
    """Return float32 snippets of shape (num_peaks, num_local_channels, num_samples)."""
    if peaks.size == 0:
        return np.zeros((0, channel_table.shape[1], nbefore + nafter), dtype="float32")
    source = PeakRetriever(recording, peaks)
    node = ExtractLocalSnippets(recording, nbefore, nafter, channel_table, parents=[source])
    return run_node_pipeline(recording, [source, node], job_kwargs, job_name="accm snippets", squeeze_output=True)


def spike_free_times(peaks, recording, nbefore, nafter, num_wanted, rng) -> np.ndarray:
    """Random peak-like entries centred in stretches with no detected spike nearby (real noise)."""
    margin = 2 * (nbefore + nafter)
    entries = []
    num_segments = recording.get_num_segments()
    per_segment = int(np.ceil(num_wanted / num_segments))
    for seg in range(num_segments):
        n_samples = recording.get_num_samples(seg)
        lo, hi = margin, n_samples - margin
        if hi <= lo:
            continue
        seg_spikes = np.sort(peaks["sample_index"][peaks["segment_index"] == seg])
        candidates = rng.integers(lo, hi, size=per_segment * 4)
        if seg_spikes.size:
            pos = np.searchsorted(seg_spikes, candidates)
            left = np.abs(candidates - seg_spikes[np.clip(pos - 1, 0, seg_spikes.size - 1)])
            right = np.abs(seg_spikes[np.clip(pos, 0, seg_spikes.size - 1)] - candidates)
            candidates = candidates[np.minimum(left, right) > margin]
        candidates = np.sort(candidates[:per_segment])
        chunk = np.zeros(candidates.size, dtype=base_peak_dtype)
        chunk["sample_index"] = candidates
        chunk["channel_index"] = rng.integers(0, recording.get_num_channels(), size=candidates.size)
        chunk["segment_index"] = seg
        entries.append(chunk)
    if not entries:
        return np.zeros(0, dtype=base_peak_dtype)
    return np.concatenate(entries)


def estimate_locations(snippets, channel_table, peaks, channel_locations, nbefore) -> np.ndarray:
    """Centre of mass of the peak-to-peak amplitudes over each snippet's channels (um, shape (n, 2))."""
    ptp = snippets.max(axis=2) - snippets.min(axis=2)  # (n, K)
    weights = np.maximum(ptp - 0.5 * ptp.max(axis=1, keepdims=True), 0.0)
    positions = channel_locations[channel_table[peaks["channel_index"]]]  # (n, K, 2)
    total = weights.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return (weights[:, :, None] * positions).sum(axis=1) / total



def recentre_table(channel_table_wide: np.ndarray, channel_table: np.ndarray, num_centres: int) -> np.ndarray:
    """Positions, inside each main channel's wide neighbourhood, of the local snippet of a nearby centre.

    Returns ``remap`` of shape (num_channels, num_centres, k): ``remap[c, j]`` lists where the
    channels of ``channel_table[wide[c, j]]`` sit in the wide snippet of main channel ``c`` (-1 if
    outside it). Used by the spatial-jitter augmentation to re-centre a spike on a neighbour.
    """
    num_channels, k_wide = channel_table_wide.shape
    k = channel_table.shape[1]
    num_centres = min(num_centres, k_wide)
    remap = np.full((num_channels, num_centres, k), -1, dtype="int64")
    for c in range(num_channels):
        where = {ch: pos for pos, ch in enumerate(channel_table_wide[c])}
        for j in range(num_centres):
            centre = channel_table_wide[c, j]
            remap[c, j] = [where.get(ch, -1) for ch in channel_table[centre]]
    return remap
