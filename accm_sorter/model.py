"""Stage 5a: the networks.

* ``SpikeEncoder``: a 1-D CNN over time whose input channels are the snippet's local channels.
* ``ProjectionHead``: the small MLP on top of the encoder that the contrastive loss sees
  (SimCLR keeps the representation *before* the head for downstream use; so do we).
* ``PairwiseClassifier``: ACCM's binary reformulation: "are these two the same neuron?"
"""

from __future__ import annotations

import torch
from torch import nn


class SpikeEncoder(nn.Module):
    def __init__(self, num_channels: int, num_samples: int, embedding_dim: int, input_scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.num_samples = num_samples
        self.embedding_dim = embedding_dim
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.conv = nn.Sequential(
            nn.Conv1d(num_channels, 16, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Conv1d(16, 32, kernel_size=5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, num_channels, num_samples)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.GELU(), nn.Linear(128, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x / self.input_scale))


class ProjectionHead(nn.Module):
    def __init__(self, embedding_dim: int, projection_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_dim, 64), nn.GELU(), nn.Linear(64, projection_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class PairwiseClassifier(nn.Module):
    """Symmetric same-neuron classifier on a pair of feature vectors.

    The pair is described by |a - b| (symmetric in the pair) plus a few scalar pair features
    (distance, log amplitude ratio), so p(a, b) == p(b, a). Only differences enter, never the
    absolute position in feature space, so what it learns transfers to clusters it was not
    trained on.
    """

    def __init__(self, feature_dim: int, num_pair_scalars: int, hidden: int = 64):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_pair_scalars = num_pair_scalars
        self.net = nn.Sequential(
            nn.Linear(feature_dim + num_pair_scalars, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """Return logits of "same neuron" for each row."""
        x = torch.cat([(a - b).abs(), scalars], dim=1)
        return self.net(x).squeeze(1)
