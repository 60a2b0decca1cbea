"""Bad input gets a clear error before heavy work, or an empty sorting with a warning."""

import numpy as np
import pytest
import spikeinterface.sorters as ss

from accm_sorter.validation import RecordingCheckError
from tests.conftest import FAST, numpy_recording


def noise(seconds=6.0, channels=4, seed=0):
    return np.random.default_rng(seed).normal(0, 5, size=(int(seconds * 30000), channels))


def test_no_probe(tmp_path):
    rec = numpy_recording(noise(), with_probe=False)
    with pytest.raises(ValueError, match="no channel locations"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_duplicated_locations():
    # SpikeInterface 0.105 refuses duplicated contacts when a probe is set, but recordings from
    # older versions or custom extractors can still report them: the check must catch it.
    from accm_sorter.validation import check_recording

    rec = numpy_recording(noise())
    rec.get_channel_locations = lambda *args, **kwargs: np.zeros((4, 2))
    with pytest.raises(RecordingCheckError, match="run_sorter_by_property"):
        check_recording(rec)


def test_unknown_parameter_suggests_the_right_name(short_gt, tmp_path):
    rec, _ = short_gt
    with pytest.raises(ValueError, match="did you mean 'detect_threshold'"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", detect_treshold=5)
    # the rejected call leaves nothing behind: the corrected call can use the same folder
    assert not (tmp_path / "x").exists()


def test_wrong_type_and_out_of_range(short_gt, tmp_path):
    rec, _ = short_gt
    with pytest.raises(TypeError, match="train_steps"):
        ss.run_sorter("accm", rec, folder=tmp_path / "a", train_steps="many")
    with pytest.raises(ValueError, match="out of range"):
        ss.run_sorter("accm", rec, folder=tmp_path / "b", detect_threshold=-1.0)
    with pytest.raises(ValueError, match="freq_min"):
        ss.run_sorter("accm", rec, folder=tmp_path / "c", freq_min=7000.0, freq_max=6000.0)
    with pytest.raises(ValueError, match="not allowed"):
        ss.run_sorter("accm", rec, folder=tmp_path / "d", device="tpu")


def test_cuda_without_cuda(short_gt, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rec, _ = short_gt
    with pytest.raises(ValueError, match="no CUDA"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", device="cuda")


def test_too_short(tmp_path):
    rec = numpy_recording(noise(seconds=0.5))
    with pytest.raises(ValueError, match="needs at least"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")


def test_nan_in_traces(tmp_path):
    traces = noise()
    traces[1000:1200, 2] = np.nan
    traces[-10:, 1] = np.inf
    rec = numpy_recording(traces)
    with pytest.raises(ValueError, match="NaN or inf"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")


def test_no_spike_crosses_threshold_gives_empty_sorting(tmp_path):
    rec = numpy_recording(noise(seconds=6.0), folder=tmp_path / "rec")
    with pytest.warns(UserWarning, match="empty sorting"):
        sorting = ss.run_sorter("accm", rec, folder=tmp_path / "x", detect_threshold=50.0, **FAST)
    assert sorting.get_num_units() == 0
    assert (tmp_path / "x" / "sorter_output" / "sorting").is_dir()


def test_in_memory_recording_asks_to_be_saved(tmp_path):
    rec = numpy_recording(noise())
    with pytest.raises(ValueError, match=r"recording.save\(folder="):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_not_a_recording(tmp_path):
    with pytest.raises((TypeError, ValueError)):
        ss.run_sorter("accm", np.zeros((100, 4)), folder=tmp_path / "x")


def test_failed_run_leaves_no_complete_looking_output(short_gt, tmp_path, monkeypatch):
    import accm_sorter.pipeline as pipeline
    from spikeinterface.sorters.utils import SpikeSortingError

    rec, _ = short_gt

    def explode(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the run")

    monkeypatch.setattr(pipeline, "embed", explode, raising=False)
    import accm_sorter.train as train

    monkeypatch.setattr(train, "embed", explode)
    with pytest.raises(SpikeSortingError):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", **FAST)
    assert not (tmp_path / "x" / "sorter_output" / "sorting").exists()
    with pytest.raises(SpikeSortingError):
        ss.read_sorter_folder(tmp_path / "x")
