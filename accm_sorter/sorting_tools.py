"""Small helpers on SpikeInterface sortings shared by several stages."""

from __future__ import annotations


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
