"""Saving and safely re-loading trained encoders.

An encoder is two files: ``encoder.pt``, a plain ``state_dict`` of tensors, and
``encoder.json``, its metadata (snippet shape, probe geometry, parameters, versions, loss
curve). Loading uses ``torch.load(weights_only=True)``: encoder files get shared between labs,
and a file that carries pickled Python objects is refused instead of executed.
"""

from __future__ import annotations

import json
from pathlib import Path

ENCODER_FILE = "encoder.pt"
METADATA_FILE = "encoder.json"


class EncoderFileError(ValueError):
    """The encoder file cannot be used; the message says why and what to do."""


def resolve_encoder_path(path) -> Path:
    """Accept encoder.pt itself, a sorter_output folder or a run folder."""
    p = Path(path)
    for candidate in (p, p / ENCODER_FILE, p / "sorter_output" / ENCODER_FILE):
        if candidate.is_file():
            return candidate
    raise EncoderFileError(
        f"pretrained_encoder={str(path)!r}: no {ENCODER_FILE} there. Give the encoder file, or the folder of a "
        "previous accm run (the one passed to run_sorter, or its sorter_output/)."
    )


def read_metadata(encoder_path: Path) -> dict:
    meta_path = encoder_path.with_name(METADATA_FILE)
    if not meta_path.is_file():
        raise EncoderFileError(f"{meta_path} is missing: accm needs it beside {encoder_path.name} to rebuild the encoder.")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EncoderFileError(f"{meta_path} is not valid JSON ({err}).") from err


def save_encoder(folder: Path, encoder, metadata: dict) -> None:
    import torch

    torch.save(encoder.state_dict(), Path(folder) / ENCODER_FILE)
    (Path(folder) / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def check_encoder_fits(metadata: dict, num_channels: int, num_samples: int, source: str) -> None:
    if (metadata["num_channels"], metadata["num_samples"]) != (num_channels, num_samples):
        raise EncoderFileError(
            f"The pretrained encoder {source} takes snippets of {metadata['num_channels']} channels x "
            f"{metadata['num_samples']} samples; this recording with these parameters gives {num_channels} x "
            f"{num_samples}. Use the same num_local_channels, ms_before and ms_after as that run "
            f"({metadata.get('params', {}).get('num_local_channels')}, {metadata.get('params', {}).get('ms_before')}, "
            f"{metadata.get('params', {}).get('ms_after')}) at the same sampling rate, or train from scratch."
        )


def load_encoder(path, num_channels: int | None = None, num_samples: int | None = None):
    """Return (encoder, metadata) from a file written by ``save_encoder``, refusing pickled code."""
    import pickle

    import torch

    from .model import SpikeEncoder

    encoder_path = resolve_encoder_path(path)
    metadata = read_metadata(encoder_path)
    if num_channels is not None and num_samples is not None:
        check_encoder_fits(metadata, num_channels, num_samples, str(encoder_path))
    try:
        state = torch.load(encoder_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise EncoderFileError(
            f"Refusing to load {encoder_path}: it is not a plain tensor state dict (weights_only loading failed: "
            f"{str(err).splitlines()[0][:200]}). Only encoder files written by accm can be reused; a file that "
            "carries pickled Python objects could run code and is never executed."
        ) from err
    encoder = SpikeEncoder(metadata["num_channels"], metadata["num_samples"], metadata["embedding_dim"])
    try:
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as err:
        raise EncoderFileError(f"{encoder_path} does not match its metadata ({str(err)[:300]}).") from err
    encoder.eval()
    return encoder, metadata
