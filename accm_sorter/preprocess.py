"""Stage 1: preprocessing with spikeinterface.preprocessing.

Band-pass, global median reference (only when there are enough channels for the median to be
noise rather than the spikes themselves) and local whitening. After whitening every channel has
unit noise variance, so detection thresholds are in noise units.
"""

from __future__ import annotations

from pathlib import Path

import spikeinterface.preprocessing as spre

MIN_CHANNELS_FOR_COMMON_REFERENCE = 8


def preprocess_recording(recording, params: dict):
    """Return a lazy float32 preprocessed recording."""
    if not params["apply_preprocessing"]:
        # Already preprocessed: only bring it to noise units so the threshold means the same thing.
        return spre.zscore(recording, mode="median+mad", dtype="float32")

    freq_max = min(params["freq_max"], 0.45 * recording.sampling_frequency)
    rec = spre.bandpass_filter(
        recording, freq_min=params["freq_min"], freq_max=freq_max, ftype="bessel", filter_order=2, dtype="float32"
    )
    use_reference = params["common_reference"] == "median" or (
        params["common_reference"] == "auto" and recording.get_num_channels() >= MIN_CHANNELS_FOR_COMMON_REFERENCE
    )
    if use_reference:
        rec = spre.common_reference(rec, reference="global", operator="median")
    if params["whiten"]:
        rec = spre.whiten(rec, dtype="float32", mode="local", radius_um=100.0, seed=params["seed"])
    else:
        rec = spre.zscore(rec, mode="median+mad", dtype="float32")
    return rec


def cache_recording(recording, mode: str, folder: Path, job_kwargs: dict):
    """Materialise the preprocessed traces once so later passes do not filter again."""
    from spikeinterface.sortingcomponents.tools import cache_preprocessing

    if mode == "none":
        return recording, None
    si_mode = {"auto": "auto", "memory": "memory", "folder": "folder"}[mode]
    return cache_preprocessing(recording, mode=si_mode, folder=folder, job_kwargs=job_kwargs)
