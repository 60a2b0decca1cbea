"""Stage 1: preprocessing with spikeinterface.preprocessing.

Band-pass, global median reference (only when there are enough channels for the median to be
noise rather than the spikes themselves) and local whitening. After whitening every channel has
unit noise variance, so detection thresholds are in noise units.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import spikeinterface.preprocessing as spre

MIN_CHANNELS_FOR_COMMON_REFERENCE = 8


def preprocess_recording(recording, params: dict, motion_folder: Path | None = None, job_kwargs: dict | None = None):
    """Return (a lazy float32 preprocessed, and when asked motion-corrected, recording, the motion or None)."""
    if not params["apply_preprocessing"]:
        # Already preprocessed: only bring it to noise units so the threshold means the same thing.
        return spre.zscore(recording, mode="median+mad", dtype="float32"), None

    freq_max = min(params["freq_max"], 0.45 * recording.sampling_frequency)
    rec = spre.bandpass_filter(
        recording, freq_min=params["freq_min"], freq_max=freq_max, ftype="bessel", filter_order=2, dtype="float32"
    )
    use_reference = params["common_reference"] == "median" or (
        params["common_reference"] == "auto" and recording.get_num_channels() >= MIN_CHANNELS_FOR_COMMON_REFERENCE
    )
    if use_reference:
        rec = spre.common_reference(rec, reference="global", operator="median")
    motion = None
    if wants_motion_correction(recording, params):
        motion = estimate_motion(rec, params, motion_folder, job_kwargs or {})
    if params["whiten"]:
        rec = spre.whiten(rec, dtype="float32", mode="local", radius_um=100.0, seed=params["seed"])
    else:
        rec = spre.zscore(rec, mode="median+mad", dtype="float32")
    if motion is not None:
        from spikeinterface.sortingcomponents.motion import InterpolateMotionRecording

        # interpolate after whitening, as tridesclous2 does: kriging then mixes unit-variance channels
        rec = InterpolateMotionRecording(rec, motion, border_mode="force_extrapolate",
                                         spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
    return rec, motion


def probe_displacement(recording, motion, sample_index, segment_index, depth_um) -> np.ndarray | None:
    """The estimated motion (um) at each spike's time and depth; None when no motion was estimated."""
    if motion is None:
        return None
    displacement = np.zeros(sample_index.size)
    for segment in np.unique(segment_index):
        here = segment_index == segment
        times = recording.sample_index_to_time(sample_index[here], segment_index=int(segment))
        displacement[here] = motion.get_displacement_at_time_and_depth(times, depth_um[here],
                                                                       segment_index=int(segment))
    return displacement


def motion_span_um(motion) -> float:
    """How far (um) the estimated probe displacement ranges over the whole recording; 0 without an estimate."""
    if motion is None:
        return 0.0
    return float(np.ptp(np.concatenate([np.ravel(displacement) for displacement in motion.displacement])))


def wants_motion_correction(recording, params: dict) -> bool:
    if params["motion_correction"] != "auto":
        return params["motion_correction"] == "on"
    depth = recording.get_channel_locations()[:, 1]
    return recording.get_num_channels() >= 16 and float(np.ptp(depth)) >= params["motion_min_extent_um"]


def estimate_motion(recording, params: dict, folder: Path | None, job_kwargs: dict):
    """Motion of the probe over time (spikeinterface.preprocessing.correct_motion's estimate)."""
    from spikeinterface.core import get_noise_levels

    # correct_motion's detector takes the noise levels cached on the recording, and computes them on
    # unseeded random chunks otherwise: two sorts of one drift recording then found different motion
    # (summed displacement 2029.34 vs 2029.42 um) and different units (16 vs 19/25 well detected).
    get_noise_levels(recording, return_in_uV=False, random_slices_kwargs=dict(seed=params["seed"]), **job_kwargs)
    _, motion_info = spre.correct_motion(
        recording, preset=params["motion_preset"], folder=folder, output_motion_info=True, overwrite=True,
        **job_kwargs,
    )
    return motion_info["motion"]


MEMORY_CACHE_MAX_BYTES = 2 * 1024**3


def cache_recording(recording, mode: str, folder: Path, job_kwargs: dict):
    """Materialise the preprocessed traces once so later passes do not filter again."""
    from spikeinterface.sortingcomponents.tools import cache_preprocessing

    if mode == "none":
        return recording, None
    if mode == "auto":
        # SpikeInterface's own 'auto' keeps traces in shared memory up to half the free RAM: on 384
        # channels x 120 s that was 5.1 GiB held for the whole run (tree RSS 12.2 GiB with 2 workers).
        # A memory-mapped folder costs one write and keeps the peak independent of the duration.
        mode = "memory" if recording.get_total_memory_size() <= MEMORY_CACHE_MAX_BYTES else "folder"
    return cache_preprocessing(recording, mode=mode, folder=folder, job_kwargs=job_kwargs)
