"""Stage 10: a curator's units laid over the self-supervised result, without moving the others.

Every self-supervised stage runs exactly as it does without labels (same spikes, same random
draws, same encoder), so a unit nobody curated comes out as it would have anyway. An earlier
version fed the labels into the encoder (a supervised contrastive term) and the clustering; the
unlabelled units then moved by +-0.02-0.06 accuracy from run-to-run variation of the encoder
(low-snr, seed 2002: 0.838 -> 0.819). The labels now act on the result:

1. ``claim_units``: a unit holding at least ``CLAIM_FRACTION`` of a curated unit's labelled spikes
   is that neuron; several such units (an over-split neuron) become one, and every labelled spike
   goes to its curated unit.
2. A curated unit that no unit claims (too small for detection or clustering) is built from its
   labelled spikes alone, so template matching knows its waveform.
3. ``find_missed_spikes``: after matching, a matched filter of each curated template runs over the
   residual traces (all matched spikes subtracted) and keeps the peaks above a threshold chosen
   for an empirical false-discovery rate: the sign-flipped template's score, which no spike
   matches, counts how many noise peaks pass each threshold.
"""

from __future__ import annotations

import numpy as np

CLAIM_FRACTION = 0.2
MISSED_SPIKES_FDR = 0.05
MIN_FITTED_AMPLITUDE = 0.5  # a matched spike has about its template's size: smaller peaks are noise
MAX_FITTED_AMPLITUDE = 2.0
SIMILAR_TEMPLATE_COSINE = 0.5
CHUNK_SECONDS = 10.0


def claim_units(labels, peak_units, num_curated):
    """Renumber units so that curated unit k is unit k; return (labels, new_id, number of units, claimed-by).

    ``peak_units`` is the curated unit of each peak (-1 = unlabelled). ``labels`` comes back with
    every labelled spike in its curated unit; ``new_id[u]`` is the number old unit ``u`` now has;
    ``claimed_by[u]`` is the curated unit that took it (-1 when none did).
    """
    num_units = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    labelled = np.flatnonzero((peak_units >= 0) & (labels >= 0))
    counts = np.zeros((num_curated, max(num_units, 1)), dtype="int64")
    np.add.at(counts, (peak_units[labelled], labels[labelled]), 1)
    totals = counts.sum(axis=1)  # labelled spikes that some unit holds (not those detection missed)
    claimed_by = np.full(num_units, -1, dtype="int64")
    for unit in range(num_units):
        k = int(counts[:, unit].argmax())
        if counts[k, unit] >= 2 and counts[k, unit] >= CLAIM_FRACTION * totals[k]:
            claimed_by[unit] = k
    unclaimed = np.flatnonzero(claimed_by < 0)
    new_id = claimed_by.copy()
    new_id[unclaimed] = num_curated + np.arange(unclaimed.size)
    out = np.where(labels >= 0, new_id[np.clip(labels, 0, None)] if num_units else -1, -1)
    out[peak_units >= 0] = peak_units[peak_units >= 0]
    return out, new_id, num_curated + unclaimed.size, claimed_by


def find_missed_spikes(residual, templates, spikes, curated_units, censor_samples, fdr=MISSED_SPIKES_FDR):
    """Spikes of ``curated_units`` that template matching missed, found on the residual traces.

    ``templates`` is a SpikeInterface ``Templates`` (unit ids = unit numbers), ``spikes`` the matched
    spikes. Returns (new spikes in the ``spikes`` dtype, report per curated unit).
    """
    from scipy.signal import find_peaks

    from .matching import matched_filter

    dense = templates.get_dense_templates()  # (units, T, channels)
    unit_ids = np.asarray(templates.unit_ids)
    nbefore = templates.nbefore
    num_samples = dense.shape[1]
    fs = residual.sampling_frequency
    chunk = int(CHUNK_SECONDS * fs)
    found, report = [], {}
    for unit in curated_units:
        if unit not in unit_ids:
            continue
        row = int(np.flatnonzero(unit_ids == unit)[0])
        template = dense[row]
        channels = np.flatnonzero(np.abs(template).max(axis=0) > 0)
        energy = float((template[:, channels] ** 2).sum())
        if energy == 0:
            continue
        similar = _similar_units(dense, row, channels)
        others = spikes[np.isin(spikes["unit_index"], unit_ids[similar])]
        own = spikes[spikes["unit_index"] == unit]
        candidates, null = [], []
        for seg in range(residual.get_num_segments()):
            length = residual.get_num_samples(seg)
            for start in range(0, length, chunk):
                end = min(length, start + chunk)
                lo, hi = max(0, start - num_samples), min(length, end + num_samples)
                traces = residual.get_traces(segment_index=seg, start_frame=lo, end_frame=hi,
                                             channel_ids=residual.channel_ids[channels]).astype("float32")
                if traces.shape[0] < num_samples:
                    continue
                score = matched_filter(traces, template[:, channels]) / energy
                # score[i] fits the template starting at sample lo + i: the spike is at lo + i + nbefore
                times = lo + np.arange(score.size) + nbefore
                inside = (times >= start) & (times < end)
                for sign, out in ((1.0, candidates), (-1.0, null)):
                    peaks, _ = find_peaks(sign * score, height=MIN_FITTED_AMPLITUDE, distance=censor_samples)
                    peaks = peaks[inside[peaks] & (sign * score[peaks] <= MAX_FITTED_AMPLITUDE)]
                    out.append(np.stack([np.full(peaks.size, seg), times[peaks], sign * score[peaks]], axis=1))
        candidates = np.concatenate(candidates) if candidates else np.zeros((0, 3))
        null = np.concatenate(null) if null else np.zeros((0, 3))
        candidates = candidates[~_near(candidates, own, censor_samples) & ~_near(candidates, others, censor_samples)]
        threshold = _fdr_threshold(candidates[:, 2], null[:, 2], fdr)
        keep = candidates[candidates[:, 2] >= threshold]
        report[int(unit)] = dict(candidates=int(candidates.shape[0]), null_peaks=int(null.shape[0]),
                                 amplitude_threshold=float(threshold), added=int(keep.shape[0]))
        new = np.zeros(keep.shape[0], dtype=spikes.dtype)
        new["segment_index"] = keep[:, 0].astype("int64")
        new["sample_index"] = keep[:, 1].astype("int64")
        new["unit_index"] = unit
        new["amplitude"] = keep[:, 2]
        found.append(new)
    found = np.concatenate(found) if found else np.zeros(0, dtype=spikes.dtype)
    return found, report


def _similar_units(dense, row, channels):
    """Units whose template looks like unit ``row``'s on its channels: their spikes' leftovers would pass."""
    mine = dense[row][:, channels].ravel()
    theirs = dense[:, :, channels].reshape(dense.shape[0], -1)
    norms = np.linalg.norm(theirs, axis=1) * np.linalg.norm(mine)
    cosine = np.divide(theirs @ mine, norms, out=np.zeros(dense.shape[0]), where=norms > 0)
    similar = cosine >= SIMILAR_TEMPLATE_COSINE
    similar[row] = False
    return np.flatnonzero(similar)


def _near(candidates, spikes, window):
    """True where a candidate (segment, sample, score) lies within ``window`` samples of a spike."""
    from .sorting_tools import distance_to_nearest

    near = np.zeros(candidates.shape[0], dtype=bool)
    for seg in np.unique(candidates[:, 0]).astype("int64"):
        mine = np.flatnonzero(candidates[:, 0] == seg)
        times = np.sort(spikes["sample_index"][spikes["segment_index"] == seg])
        near[mine] = distance_to_nearest(times, candidates[mine, 1].astype("int64")) < window
    return near


def _fdr_threshold(scores, null_scores, fdr):
    """Lowest score at which (1 + null peaks above it) / (candidates above it) stays within ``fdr``.

    The +1 (as in Barber and Candes' knockoff+) keeps a handful of chance peaks from passing where
    the null has none: labels on pure noise otherwise gained 3 spikes at the top of the range.
    """
    if scores.size == 0:
        return np.inf
    order = np.sort(scores)[::-1]
    null_sorted = np.sort(null_scores)
    false = null_sorted.size - np.searchsorted(null_sorted, order, side="left")
    ratio = (false + 1) / np.arange(1, order.size + 1)
    passing = np.flatnonzero(ratio <= fdr)
    return float(order[passing.max()]) if passing.size else np.inf
