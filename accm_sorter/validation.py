"""Checks on the recording that run before any heavy work, each with the fix in its message."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MIN_DURATION_S = 3.0
NUM_PROBE_CHUNKS = 8
PROBE_CHUNK_S = 0.05


class RecordingCheckError(ValueError):
    """The recording cannot be sorted as it is; the message says what to change."""


class OutputFolderError(ValueError, OSError):
    """The output folder cannot be used; the message says what to change."""


def not_a_recording_message(obj) -> str:
    """What to do when run_sorter gets something other than one recording."""
    from spikeinterface.core import BaseRecording, BaseSorting

    name = type(obj).__name__
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(r, BaseRecording) for r in obj):
        rates = sorted({float(r.sampling_frequency) for r in obj})
        advice = (
            f"accm sorts one recording at a time, got a {name} of {len(obj)} recordings. To sort them one by one, "
            "use spikeinterface.sorters.run_sorter_jobs (one job per recording) or pass a dict "
            "{name: recording} to run_sorter. To sort them as one session, join them first with "
            "spikeinterface.core.concatenate_recordings (one segment) or append_recordings (one segment each)"
        )
        if len(rates) > 1:
            advice += (
                f"; they have different sampling rates ({', '.join(f'{r:g}' for r in rates)} Hz), so resample them "
                "to one rate first (spikeinterface.preprocessing.resample)"
            )
        return advice + "."
    if isinstance(obj, (str, os.PathLike)):
        return (
            f"accm sorts a spikeinterface recording, got a path ({str(obj)!r}). Load it first: "
            "spikeinterface.load(path) for a saved SpikeInterface folder, or a reader from "
            "spikeinterface.extractors (e.g. se.read_spikeglx(path)) for raw data."
        )
    if isinstance(obj, BaseSorting):
        return "accm sorts a recording, got a sorting: pass the recording the sorting came from."
    return (
        f"accm sorts a spikeinterface BaseRecording, got {name}. Load your data with "
        "spikeinterface.extractors (e.g. se.read_spikeglx) or wrap a NumPy array with "
        "spikeinterface.core.NumpyRecording(traces_list=[traces], sampling_frequency=...) "
        "(traces of shape (num_samples, num_channels))."
    )


def check_recording(recording) -> None:
    from spikeinterface.core import BaseRecording

    if not isinstance(recording, BaseRecording):
        raise TypeError(not_a_recording_message(recording))
    num_channels = recording.get_num_channels()
    if num_channels == 0:
        raise RecordingCheckError(
            "The recording has no channels; there is nothing to sort. Check the stream you loaded and any channel "
            "selection (select_channels, remove_channels, split_by) applied before sorting."
        )
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
    """Look for NaN/inf in the first and last samples and a few random chunks of every segment, and refuse
    traces that are constant on every channel in all of those chunks (all zeros, a wrong stream or dtype)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, int(PROBE_CHUNK_S * recording.sampling_frequency))
    varies = np.zeros(recording.get_num_channels(), dtype=bool)
    first_values = None
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
            if traces.shape[0]:
                if first_values is None:
                    first_values = traces[0].copy()
                varies |= np.any(traces != first_values[np.newaxis, :], axis=0)
    if not varies.any():
        value = "zero" if first_values is not None and not np.any(first_values) else "constant"
        raise RecordingCheckError(
            f"The traces are {value} on every channel (checked at the start, the end and {NUM_PROBE_CHUNKS} "
            "random chunks of each segment): there is no signal to sort. Check that the right file, stream and "
            "dtype were loaded (e.g. the .ap stream of a SpikeGLX folder) and that the channels are connected."
        )


def check_output_folder(output_folder, remove_existing_folder: bool) -> None:
    """Refuse an output folder that run_sorter could not create or replace, saying what to change."""
    folder = Path(output_folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(
            f"The output folder {folder} is an existing file, not a folder. Choose another folder=... for the run."
        )
    if folder.is_dir():
        if not remove_existing_folder:
            raise OutputFolderError(
                f"The output folder {folder} already exists. Pass remove_existing_folder=True to replace it "
                "(accm-sorter sort --overwrite on the command line), "
                "choose another folder=..., or, if it holds a finished run, load it with "
                "spikeinterface.sorters.read_sorter_folder(folder)."
            )
        for path in (folder.parent, folder):
            if not os.access(path, os.W_OK | os.X_OK):
                raise OutputFolderError(
                    f"The output folder {folder} exists and cannot be replaced: no write permission in {path}. "
                    "Choose a folder=... you can write to, or change the permissions of that folder."
                )
        return
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputFolderError(
            f"Cannot create the output folder {folder}: {ancestor} is a file, not a folder. Choose a folder=... "
            "whose parent is a folder you can write to."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"Cannot create the output folder {folder}: no write permission in {ancestor}. Choose a folder=... "
            "you can write to (e.g. under your home or scratch folder), or change the permissions of "
            f"{ancestor}."
        )
