"""Saving, safely re-loading and reusing a trained encoder."""

import os

import numpy as np
import pytest
import spikeinterface.sorters as ss
import torch

from accm_sorter.encoder_io import EncoderFileError, load_encoder
from accm_sorter.train import embed
from tests.conftest import FAST


class RunsCode:
    """A pickled object whose unpickling would create a file: it must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_round_trip_reproduces_the_saved_embeddings(sorted_small):
    _, folder = sorted_small
    out = folder / "sorter_output"
    encoder, meta = load_encoder(folder)  # the run folder is accepted
    assert meta["num_channels"] == encoder.num_channels
    from accm_sorter.scenarios import generate_scenario  # noqa: F401  (the recording is not needed)

    saved = np.load(out / "embeddings.npy").astype("float32")
    assert saved.shape[1] == meta["embedding_dim"]
    # re-embedding random snippets twice with the re-loaded encoder is deterministic and finite
    x = np.random.default_rng(0).normal(size=(64, meta["num_channels"], meta["num_samples"])).astype("float32")
    a, b = embed(encoder, x, torch.device("cpu")), embed(load_encoder(out / "encoder.pt")[0], x, torch.device("cpu"))
    assert np.array_equal(a, b) and np.isfinite(a).all()


def test_pickled_code_is_refused_not_run(sorted_small, tmp_path):
    _, folder = sorted_small
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "encoder.json").write_text((folder / "sorter_output" / "encoder.json").read_text())
    marker = tmp_path / "code_was_run"
    torch.save({"conv.0.weight": RunsCode(str(marker))}, bad / "encoder.pt")
    with pytest.raises(EncoderFileError, match="Refusing to load"):
        load_encoder(bad)
    assert not marker.exists()


def test_mismatched_geometry_is_a_clear_error_before_work(sorted_small, short_gt, tmp_path):
    _, folder = sorted_small
    recording, _ = short_gt
    with pytest.raises(ValueError, match="num_local_channels"):
        ss.run_sorter("accm", recording, folder=tmp_path / "x", pretrained_encoder=str(folder),
                      num_local_channels=4, **FAST)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="no encoder.pt"):
        ss.run_sorter("accm", recording, folder=tmp_path / "y", pretrained_encoder=str(tmp_path), **FAST)


def test_sorting_with_a_reused_encoder(sorted_small, short_gt, tmp_path):
    _, folder = sorted_small
    recording, gt = short_gt
    sorting = ss.run_sorter("accm", recording, folder=tmp_path / "reuse", pretrained_encoder=str(folder),
                            pretrained_train_steps=0, job_kwargs=dict(n_jobs=1))
    assert sorting.get_num_units() > 0
    log = (tmp_path / "reuse" / "sorter_output" / "accm.log").read_text()
    assert "starting from pretrained encoder" in log
    # no training ran: the reused weights are the ones saved
    reused, _ = load_encoder(tmp_path / "reuse")
    original, _ = load_encoder(folder)
    for (name, a), (_, b) in zip(reused.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
