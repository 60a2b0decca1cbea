"""Stage 2: threshold detection with spikeinterface.sortingcomponents.

A peak is a threshold crossing (in noise units) that is the largest within ``detect_radius_um``
and ``exclude_sweep_ms``: SpikeInterface's ``locally_exclusive`` detector does exactly this,
chunked and parallel through ``job_kwargs``.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.core import get_noise_levels
from spikeinterface.sortingcomponents.peak_detection import detect_peaks


def estimate_noise_levels(recording, seed: int, job_kwargs: dict) -> np.ndarray:
    noise_levels = get_noise_levels(
        recording, return_in_uV=False, random_slices_kwargs=dict(seed=seed), **job_kwargs
    )
    if not np.all(np.isfinite(noise_levels)):
        bad = recording.channel_ids[~np.isfinite(noise_levels)]
        raise ValueError(
            f"The traces contain NaN or inf on channel(s) {list(bad)[:10]}: remove those channels "
            "(recording.remove_channels) or repair the data before sorting."
        )
    # A dead (flat) channel has zero noise: give it a huge threshold instead of dividing by zero.
    return np.where(noise_levels > 0, noise_levels, np.inf).astype("float32")


def detect_spikes(recording, noise_levels: np.ndarray, params: dict, job_kwargs: dict) -> np.ndarray:
    """Return SpikeInterface's peak vector (sample_index, channel_index, amplitude, segment_index)."""
    method_kwargs = dict(
        peak_sign=params["peak_sign"],
        detect_threshold=params["detect_threshold"],
        exclude_sweep_ms=params["exclude_sweep_ms"],
        radius_um=params["detect_radius_um"],
        noise_levels=noise_levels,
    )
    peaks = detect_peaks(recording, method="locally_exclusive", method_kwargs=method_kwargs, job_kwargs=job_kwargs)
    order = np.lexsort((peaks["sample_index"], peaks["segment_index"]))
    return peaks[order]
