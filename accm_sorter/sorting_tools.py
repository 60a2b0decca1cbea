"""Small helpers on spike times and SpikeInterface sortings shared by several stages."""

from __future__ import annotations

import numpy as np


def global_sample_index(spikes, recording) -> tuple[np.ndarray, int]:
    """Sample indices on one timeline across segments, and its length (for rates and refractory tests)."""
    lengths = [recording.get_num_samples(s) for s in range(recording.get_num_segments())]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("int64")
    return spikes["sample_index"] + offsets[spikes["segment_index"]], int(sum(lengths))


def time_ordered(*parts) -> np.ndarray:
    """The spike vectors ``parts`` as one, ordered by segment and, within it, by sample (stable)."""
    spikes = np.concatenate(parts)
    return spikes[np.lexsort((spikes["sample_index"], spikes["segment_index"]))]


def distance_to_nearest(sorted_times: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Distance (samples) from each of ``samples`` to the nearest of ``sorted_times`` (inf when there is none)."""
    if sorted_times.size == 0:
        return np.full(samples.shape, np.inf)
    pos = np.searchsorted(sorted_times, samples)
    before = np.abs(samples - sorted_times[np.clip(pos - 1, 0, sorted_times.size - 1)])
    after = np.abs(sorted_times[np.clip(pos, 0, sorted_times.size - 1)] - samples)
    return np.minimum(before, after)


def close_positions(sorted_times: np.ndarray, max_lag: int, max_step: int | None = None):
    """Yield (step, positions): the positions i of ``sorted_times`` whose entry i + step is at most ``max_lag``
    after it, for step = 1, 2, ... (up to ``max_step``) until no entry is that close."""
    last = sorted_times.size if max_step is None else min(sorted_times.size, max_step + 1)
    for step in range(1, last):
        close = np.flatnonzero(sorted_times[step:] - sorted_times[:-step] <= max_lag)
        if close.size == 0:
            return
        yield step, close


def with_all_segments(sorting, num_segments: int):
    """``sorting`` with ``num_segments`` segments. SpikeInterface's NumpySorting counts segments up to the last one
    that holds a spike, so trailing segments without spikes (or every segment of an empty sorting) vanish and
    run_sorter then fails to register the multi-segment recording to the sorting."""
    if sorting.get_num_segments() >= num_segments:
        return sorting
    from spikeinterface.core import NumpySorting
    from spikeinterface.core.numpyextractors import SpikeVectorSortingSegment

    padded = NumpySorting.from_sorting(sorting, with_metadata=True, copy_spike_vector=True)
    spikes = padded.to_spike_vector()
    for segment_index in range(padded.get_num_segments(), num_segments):
        padded.add_sorting_segment(SpikeVectorSortingSegment(spikes, segment_index, padded.unit_ids))
    return padded
