"""Stage 4: spike augmentations that make positive pairs.

Two views of the same spike must look like two spikes of the same neuron would: slightly shifted
and warped in time, slightly scaled, with different background noise (real noise snippets cut
from the recording), sometimes with another neuron's spike on top (a collision) and sometimes with
a few channels missing (spatial jitter). Everything is batched torch on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AugmentConfig:
    jitter_samples: float
    time_warp: float
    amplitude_scale: float
    noise_scale: float
    overlap_prob: float
    overlap_max_lag: int
    channel_dropout: float

    @classmethod
    def from_params(cls, params: dict, sampling_frequency: float) -> "AugmentConfig":
        return cls(
            jitter_samples=params["aug_jitter_samples"],
            time_warp=params["aug_time_warp"],
            amplitude_scale=params["aug_amplitude_scale"],
            noise_scale=params["aug_noise_scale"],
            overlap_prob=params["aug_overlap_prob"],
            overlap_max_lag=int(round(params["aug_overlap_max_lag_ms"] * sampling_frequency / 1000.0)),
            channel_dropout=params["aug_channel_dropout"],
        )


def resample_time(x: torch.Tensor, shift: torch.Tensor, stretch: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation resampling of (B, K, T) at t' = (t - c) * stretch + c + shift (edges held)."""
    num_samples = x.shape[-1]
    t = torch.arange(num_samples, device=x.device, dtype=x.dtype)
    centre = (num_samples - 1) / 2.0
    source = (t[None, :] - centre) * stretch[:, None] + centre + shift[:, None]  # (B, T)
    source = source.clamp(0, num_samples - 1)
    left = source.floor().long().clamp(max=num_samples - 2) if num_samples > 1 else source.floor().long()
    frac = (source - left.to(x.dtype))[:, None, :]
    left = left[:, None, :].expand(-1, x.shape[1], -1)
    right = (left + 1).clamp(max=num_samples - 1)
    return torch.gather(x, 2, left) * (1 - frac) + torch.gather(x, 2, right) * frac


def shift_integer(x: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
    """Shift each (K, T) item by an integer lag with zero fill."""
    num_samples = x.shape[-1]
    t = torch.arange(num_samples, device=x.device)
    source = t[None, :] - lags[:, None]
    valid = (source >= 0) & (source < num_samples)
    idx = source.clamp(0, num_samples - 1)[:, None, :].expand(-1, x.shape[1], -1)
    return torch.gather(x, 2, idx) * valid[:, None, :].to(x.dtype)


def recentre(
    wide: torch.Tensor, remap: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Spatial jitter: cut each spike's local snippet around a random eligible nearby centre.

    ``wide`` (B, K_wide, T) are snippets on a wide neighbourhood of the main channel, ``remap``
    (B, J, K) the positions of each candidate centre's local channels inside it (-1: outside),
    ``eligible`` (B, J) which candidate centres carry enough of the spike to have been its peak.
    """
    weights = eligible.to(wide.dtype) + 1e-6
    choice = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
    index = remap[torch.arange(wide.shape[0], device=wide.device), choice]  # (B, K)
    gathered = torch.gather(wide, 1, index.clamp(min=0)[:, :, None].expand(-1, -1, wide.shape[2]))
    return gathered * (index >= 0)[:, :, None].to(wide.dtype)


def augment(
    spikes: torch.Tensor,
    noise_bank: torch.Tensor,
    collision_bank: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return one random view of each spike in ``spikes`` (B, K, T).

    ``noise_bank`` holds real noise snippets (same shape per item); ``collision_bank`` holds other
    spikes that can be added as collisions.
    """
    batch = spikes.shape[0]
    device, dtype = spikes.device, spikes.dtype

    def uniform(low, high, size=(batch,)):
        return torch.rand(size, generator=generator, device=device, dtype=dtype) * (high - low) + low

    shift = uniform(-config.jitter_samples, config.jitter_samples)
    stretch = 1.0 + uniform(-config.time_warp, config.time_warp)
    view = resample_time(spikes, shift, stretch)

    view = view * uniform(1 - config.amplitude_scale, 1 + config.amplitude_scale)[:, None, None]

    if config.overlap_prob > 0 and collision_bank.shape[0] > 0:
        pick = torch.randint(0, collision_bank.shape[0], (batch,), generator=generator, device=device)
        other = collision_bank[pick]
        lags = torch.randint(
            -config.overlap_max_lag, config.overlap_max_lag + 1, (batch,), generator=generator, device=device
        )
        other = shift_integer(other, lags)
        # The added spike stays smaller than the spike itself, otherwise the view is the other neuron's.
        own_peak = spikes.abs().amax(dim=(1, 2)).clamp(min=1e-6)
        other_peak = other.abs().amax(dim=(1, 2)).clamp(min=1e-6)
        scale = uniform(0.2, 0.7) * own_peak / other_peak
        use = (torch.rand(batch, generator=generator, device=device) < config.overlap_prob).to(dtype)
        view = view + other * (scale * use)[:, None, None]

    if config.noise_scale > 0 and noise_bank.shape[0] > 0:
        pick = torch.randint(0, noise_bank.shape[0], (batch,), generator=generator, device=device)
        view = view + noise_bank[pick] * uniform(0.0, config.noise_scale)[:, None, None]

    if config.channel_dropout > 0 and spikes.shape[1] > 1:
        keep = (torch.rand(spikes.shape[:2], generator=generator, device=device) >= config.channel_dropout).to(dtype)
        keep[:, 0] = 1.0  # the main channel always stays
        view = view * keep[:, :, None]
    return view
