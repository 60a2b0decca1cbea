"""Stage 6: density clustering of the contrastive embeddings with HDBSCAN.

Local snippets do not know where on the probe they were cut, so two neurons with similar
waveforms far apart would share an embedding: the spike's estimated position (centre of mass) is
appended to the standardised embedding, scaled by ``location_scale_um``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureScaling:
    mean: np.ndarray
    std: np.ndarray
    location_scale_um: float

    def transform(self, embeddings: np.ndarray, locations: np.ndarray) -> np.ndarray:
        standardised = (embeddings - self.mean) / self.std
        return np.hstack([standardised, locations / self.location_scale_um]).astype("float32")


def fit_feature_scaling(embeddings: np.ndarray, location_scale_um: float) -> FeatureScaling:
    std = embeddings.std(axis=0)
    return FeatureScaling(embeddings.mean(axis=0), np.where(std > 0, std, 1.0), location_scale_um)


def cluster_features(features: np.ndarray, min_cluster_size: int, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HDBSCAN labels (-1 = noise) and membership probabilities."""
    import hdbscan

    if features.shape[0] < 2 * min_cluster_size:
        return np.full(features.shape[0], -1, dtype="int64"), np.zeros(features.shape[0])
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=max(2, min_cluster_size // 2),
        cluster_selection_method="eom",
        core_dist_n_jobs=max(1, n_jobs),
    )
    labels = clusterer.fit_predict(features).astype("int64")
    return labels, np.asarray(clusterer.probabilities_, dtype="float64")
