"""Stage 5b: contrastive training of the encoder (NT-Xent / InfoNCE) and batched inference."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import AugmentConfig, augment, recentre
from .model import ProjectionHead, SpikeEncoder


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy: each view must pick its partner among 2B-1."""
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(z.device)
    return F.cross_entropy(logits, targets)


def spatial_jitter_candidates(wide_snippets: np.ndarray, num_centres: int, ratio: float) -> np.ndarray:
    """(n, num_centres) bool: which of the nearest channels peak within ``ratio`` of the main one."""
    peak = np.abs(wide_snippets[:, :num_centres, :]).max(axis=2)
    eligible = peak >= ratio * peak[:, :1]
    eligible[:, 0] = True
    return eligible


def supervised_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor,
                                temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): every other view with the same label is a positive."""
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    labels = torch.cat([labels, labels])
    logits = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    return (-(log_prob * positives).sum(dim=1) / positives.sum(dim=1).clamp(min=1)).mean()


def train_encoder(
    wide_snippets: np.ndarray,
    main_channels: np.ndarray,
    remap_table: np.ndarray,
    noise_snippets: np.ndarray,
    params: dict,
    sampling_frequency: float,
    device: torch.device,
    verbose: bool = False,
    initial_encoder: SpikeEncoder | None = None,
    spike_labels: np.ndarray | None = None,
) -> tuple[SpikeEncoder, list[float]]:
    """Train an encoder on this recording's own spikes; return it and the loss curve.

    From scratch by default; from ``initial_encoder`` (a reused encoder) for
    ``pretrained_train_steps`` steps otherwise. With ``spike_labels`` (unit index per training
    spike, -1 when unlabelled) a supervised contrastive term on the labelled spikes is added.
    """
    seed = params["seed"]
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    num_spikes = wide_snippets.shape[0]
    num_centres, num_channels = remap_table.shape[1:]
    num_samples = wide_snippets.shape[2]
    local = wide_snippets[:, :num_channels]
    input_scale = float(np.median(np.abs(local).max(axis=(1, 2)))) or 1.0
    if initial_encoder is None:
        encoder = SpikeEncoder(num_channels, num_samples, params["embedding_dim"], input_scale).to(device)
        steps = params["train_steps"]
    else:
        encoder = initial_encoder.to(device)
        steps = params["pretrained_train_steps"]
        if steps == 0:
            encoder.eval()
            return encoder, []
    head = ProjectionHead(encoder.embedding_dim, params["projection_dim"]).to(device)
    optimiser = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=params["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    config = AugmentConfig.from_params(params, sampling_frequency)

    eligible = spatial_jitter_candidates(wide_snippets, num_centres, params["aug_spatial_jitter_ratio"])
    wide = torch.as_tensor(wide_snippets, device=device)
    spikes = torch.as_tensor(np.ascontiguousarray(local), device=device)
    eligible = torch.as_tensor(eligible, device=device)
    remap = torch.as_tensor(remap_table, device=device)
    mains = torch.as_tensor(main_channels, device=device)
    noise = torch.as_tensor(noise_snippets, device=device)
    batch_size = min(params["batch_size"], num_spikes)
    labelled = np.flatnonzero(spike_labels >= 0) if spike_labels is not None else np.zeros(0, "int64")
    labelled_index = torch.as_tensor(labelled, device=device)
    labelled_units = torch.as_tensor(spike_labels[labelled] if labelled.size else labelled, device=device)
    losses = []
    encoder.train()
    head.train()
    for step in tqdm(range(steps), desc="accm contrastive training", disable=not verbose, mininterval=1.0):
        pick = torch.randint(0, num_spikes, (batch_size,), generator=generator, device=device)
        batch_wide, batch_remap, batch_eligible = wide[pick], remap[mains[pick]], eligible[pick]
        view1 = augment(recentre(batch_wide, batch_remap, batch_eligible, generator), noise, spikes, config, generator)
        view2 = augment(recentre(batch_wide, batch_remap, batch_eligible, generator), noise, spikes, config, generator)
        loss = nt_xent_loss(head(encoder(view1)), head(encoder(view2)), params["temperature"])
        if labelled.size >= 2:
            which = torch.randint(0, labelled.size, (min(batch_size, labelled.size),), generator=generator,
                                  device=device)
            pick = labelled_index[which]
            batch_wide, batch_remap, batch_eligible = wide[pick], remap[mains[pick]], eligible[pick]
            v1 = augment(recentre(batch_wide, batch_remap, batch_eligible, generator), noise, spikes, config, generator)
            v2 = augment(recentre(batch_wide, batch_remap, batch_eligible, generator), noise, spikes, config, generator)
            loss = loss + params["labels_weight"] * supervised_contrastive_loss(
                head(encoder(v1)), head(encoder(v2)), labelled_units[which], params["temperature"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(
                f"Contrastive training diverged at step {step} (loss={losses[-1]}). Lower learning_rate "
                f"(now {params['learning_rate']})."
            )
    encoder.eval()
    return encoder, losses


@torch.inference_mode()
def embed(encoder: SpikeEncoder, snippets: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Encoder representation of every snippet, batched (float32, shape (n, embedding_dim)).

    Batches of ~1000 keep a small CNN's activations in CPU cache: measured 4x faster than 8192.
    """
    encoder.eval()
    out = np.zeros((snippets.shape[0], encoder.embedding_dim), dtype="float32")
    # float16 on CUDA only: a 1-D CNN's inference is safe in half precision there, while CPU autocast
    # (bfloat16) would cost accuracy and, on most CPUs, time
    half = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with half:
        for start in range(0, snippets.shape[0], batch_size):
            chunk = torch.as_tensor(np.ascontiguousarray(snippets[start : start + batch_size]), device=device)
            out[start : start + chunk.shape[0]] = encoder(chunk).float().cpu().numpy()
    return out
