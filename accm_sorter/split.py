"""Stage 8b: split units that hold more than one neuron, and join units that are one.

The contrastive embedding is trained to ignore what varies within a neuron (jitter, amplitude,
noise, collisions), and sometimes it also ignores the small waveform differences between two
neurons at the same place. Each unit is therefore looked at once more on its own: its spikes'
waveforms on the unit's channels are reduced by PCA and clustered by HDBSCAN. A split is kept only
when the parts' mean waveforms really differ (cosine similarity below ``max_similarity`` at every
small lag), so one neuron's amplitude drift or noisy tail is not cut in two.
"""

from __future__ import annotations

import numpy as np

from .cluster import cluster_features
from .pairwise import template_similarity

PCA_COMPONENTS = 6
MAX_SPIKES_PER_SPLIT = 4000
MAX_LAG_SAMPLES = 2
DUPLICATE_AMPLITUDE_RATIO = 0.8


def aligned_waveforms(snippets, main_channels, channel_table, index, target_channels):
    """Snippets of ``index`` on ``target_channels``; spikes whose snippet lacks one of them are left out."""
    rows = channel_table[main_channels[index]]  # (n, K) global channel of each snippet row
    position = np.full((index.size, target_channels.size), -1, dtype="int64")
    for j, channel in enumerate(target_channels):
        hit = rows == channel
        position[:, j] = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    complete = (position >= 0).all(axis=1)
    chosen = index[complete]
    waves = snippets[chosen[:, None], position[complete]]  # (n, C, T)
    return chosen, waves


def split_mixed_units(labels, snippets, main_channels, channel_table, min_cluster_size, max_similarity, seed,
                      max_depth, protected=(), log=None) -> tuple[np.ndarray, list]:
    """Labels with mixed units split into their parts (new units numbered after the existing ones).

    The parts of a split are tried again, each with its own PCA, up to ``max_depth`` levels: the
    first PCA of a mixture of several neurons is dominated by the most different one.
    """
    from sklearn.decomposition import PCA

    labels = labels.copy()
    rng = np.random.default_rng(seed)
    report = []
    num_units = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    queue = [(int(unit), 1) for unit in np.setdiff1d(np.arange(num_units), protected)]
    while queue:
        unit, depth = queue.pop(0)
        index = np.flatnonzero(labels == unit)
        if index.size < 4 * min_cluster_size:
            continue
        main = np.bincount(main_channels[index]).argmax()
        target = channel_table[main][: max(1, channel_table.shape[1] // 2)]
        chosen, waves = aligned_waveforms(snippets, main_channels, channel_table, index, target)
        if chosen.size < 4 * min_cluster_size:
            continue
        fit = rng.choice(chosen.size, min(chosen.size, MAX_SPIKES_PER_SPLIT), replace=False)
        flat = waves.reshape(waves.shape[0], -1)
        pca = PCA(min(PCA_COMPONENTS, flat.shape[1]), random_state=seed).fit(flat[fit])
        parts, _ = cluster_features(pca.transform(flat[fit]), max(min_cluster_size, fit.size // 20))
        num_parts = int(parts.max()) + 1
        if num_parts < 2:
            continue
        means = np.stack([waves[fit][parts == p].mean(axis=0) for p in range(num_parts)])
        similarity = min(template_similarity(means[a], means[b], MAX_LAG_SAMPLES)[0]
                         for a in range(num_parts) for b in range(a + 1, num_parts))
        if similarity >= max_similarity:
            continue
        # every spike of the unit goes to the part whose mean waveform it is closest to
        projected_means = pca.transform(means.reshape(num_parts, -1))
        nearest = np.linalg.norm(pca.transform(flat)[:, None, :] - projected_means[None], axis=2).argmin(axis=1)
        new_ids = np.concatenate([[unit], labels.max() + 1 + np.arange(num_parts - 1)])
        labels[chosen] = new_ids[nearest]
        if depth < max_depth:
            queue.extend((int(part), depth + 1) for part in new_ids)
        report.append(dict(unit=int(unit), depth=depth, parts=num_parts, min_similarity=round(float(similarity), 3),
                           sizes=np.bincount(nearest, minlength=num_parts).tolist()))
        if log is not None:
            log(f"split unit {unit} into {num_parts} (waveform similarity {similarity:.2f})")
    return labels, report


def merge_duplicate_units(labels, templates, samples, total_samples, sampling_frequency, min_similarity,
                          protected=(), log=None) -> tuple[np.ndarray, list]:
    """Join units with the same mean waveform whose spike trains never collide in the refractory period.

    Clustering can cut one big neuron into pieces (probe32, seed 2002: a unit of 1631 spikes came out
    as four units whose templates have cosine 0.996-1.0); the pairwise merge runs before splitting
    and does not see the pieces a split leaves. Two units are joined when their templates
    (``templates``, (units, channels, T)) have cosine >= ``min_similarity`` at lags <= 2 samples,
    peak amplitudes within 20 %, and the refractory guard of the pairwise merge holds. ``protected``
    units (a curator's) are never joined.
    """
    from .pairwise import MAX_MERGE_REFRACTORY_RATIO, UNINFORMATIVE_REFRACTORY_RATIO, refractory_ratio

    num_units = templates.shape[0]
    peak = np.abs(templates).max(axis=(1, 2))
    candidates = []
    for a in np.setdiff1d(np.arange(num_units), protected):
        for b in np.setdiff1d(np.arange(a + 1, num_units), protected):
            if min(peak[a], peak[b]) < DUPLICATE_AMPLITUDE_RATIO * max(peak[a], peak[b]):
                continue
            cosine, _ = template_similarity(templates[a], templates[b], MAX_LAG_SAMPLES)
            if cosine >= min_similarity:
                candidates.append((cosine, a, b))
    group = np.arange(num_units)
    report = []
    for cosine, a, b in sorted(candidates, reverse=True):
        ga, gb = group[a], group[b]
        if ga == gb:
            continue
        train_a = np.sort(samples[np.isin(labels, np.flatnonzero(group == ga))])
        train_b = np.sort(samples[np.isin(labels, np.flatnonzero(group == gb))])
        ratio = refractory_ratio(train_a, train_b, total_samples, sampling_frequency)
        if ratio > MAX_MERGE_REFRACTORY_RATIO and ratio != UNINFORMATIVE_REFRACTORY_RATIO:
            continue
        group[group == gb] = ga
        report.append(dict(a=int(a), b=int(b), template_cosine=round(float(cosine), 4),
                           refractory_ratio=round(float(ratio), 3)))
        if log is not None:
            log(f"joined duplicate units {a} and {b} (template cosine {cosine:.3f}, refractory ratio {ratio:.2f})")
    _, new_id = np.unique(group, return_inverse=True)
    return np.where(labels >= 0, new_id[np.clip(labels, 0, None)], -1), report
