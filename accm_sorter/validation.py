"""Checks on the recording that run before any heavy work, each with the fix in its message."""

from __future__ import annotations

import numpy as np

MIN_DURATION_S = 3.0
NUM_PROBE_CHUNKS = 8
PROBE_CHUNK_S = 0.05


class RecordingCheckError(ValueError):
    """The recording cannot be sorted as it is; the message says what to change."""


def check_recording(recording) -> None:
    from spikeinterface.core import BaseRecording

    if not isinstance(recording, BaseRecording):
        raise TypeError(
            f"accm sorts a spikeinterface BaseRecording, got {type(recording).__name__}. Load your data with "
            "spikeinterface.extractors (e.g. se.read_spikeglx) or wrap a NumPy array with "
            "spikeinterface.core.NumpyRecording."
        )
    num_channels = recording.get_num_channels()
    if num_channels == 0:
        raise RecordingCheckError("The recording has no channels; there is nothing to sort.")
    if not recording.has_probe():
        raise RecordingCheckError(
            "The recording has no channel locations: accm needs them to pick each spike's neighbouring channels. "
            "Attach the probe with recording.set_probe(probe) (probeinterface), or give contact positions "
            "with recording.set_dummy_probe_from_locations(locations) (an array of shape (num_channels, 2) in um)."
        )
    try:
        locations = np.asarray(recording.get_channel_locations())
    except Exception as err:  # SpikeInterface raises a bare Exception for overlapping probes
        raise RecordingCheckError(
            f"Cannot read channel locations ({err}). If the recording holds several shanks or tetrodes drawn at the "
            "same coordinates, sort each with spikeinterface.sorters.run_sorter_by_property(..., "
            "grouping_property='group')."
        ) from err
    if not np.all(np.isfinite(locations)):
        raise RecordingCheckError("Some channel locations are NaN or inf: fix the probe geometry.")
    if len({tuple(row) for row in locations.round(6)}) != num_channels:
        raise RecordingCheckError(
            "Two or more channels share the same location. If they belong to different shanks or tetrodes, sort "
            "each group with spikeinterface.sorters.run_sorter_by_property(..., grouping_property='group'); "
            "otherwise fix the probe geometry."
        )
    duration = sum(recording.get_duration(s) for s in range(recording.get_num_segments()))
    if duration < MIN_DURATION_S:
        raise RecordingCheckError(
            f"The recording lasts {duration:.3f} s; accm trains its encoder on the recording's own spikes and "
            f"needs at least {MIN_DURATION_S:g} s (in practice a minute or more)."
        )
    check_finite_traces(recording)
    if not (recording.check_serializability("json") or recording.check_serializability("pickle")):
        raise RecordingCheckError(
            "This in-memory recording cannot be written to the sorter folder, which run_sorter needs to reload it. "
            "Save it first: recording = recording.save(folder='my_recording') (binary, memory-mapped)."
        )


def check_finite_traces(recording, seed: int = 0) -> None:
    """Look for NaN/inf in the first and last samples and a few random chunks of every segment."""
    rng = np.random.default_rng(seed)
    chunk = max(1, int(PROBE_CHUNK_S * recording.sampling_frequency))
    for seg in range(recording.get_num_segments()):
        n = recording.get_num_samples(seg)
        starts = {0, max(0, n - chunk)}
        starts.update(int(s) for s in rng.integers(0, max(1, n - chunk), size=NUM_PROBE_CHUNKS))
        for start in sorted(starts):
            traces = recording.get_traces(segment_index=seg, start_frame=start, end_frame=min(n, start + chunk))
            if not np.all(np.isfinite(traces)):
                bad = recording.channel_ids[~np.all(np.isfinite(traces), axis=0)]
                raise RecordingCheckError(
                    f"The traces contain NaN or inf (segment {seg}, near sample {start}, channel(s) "
                    f"{list(bad)[:10]}). Remove those channels with recording.remove_channels(...) or repair the "
                    "data (e.g. spikeinterface.preprocessing.remove_artifacts) before sorting."
                )
