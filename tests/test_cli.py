"""The command line: params, sort and demo."""

import subprocess
import sys

import numpy as np

from accm_sorter.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accm_sorter.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_params_lists_every_parameter(capsys):
    from accm_sorter.params import PARAMETERS

    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in PARAMETERS)


def test_sort_a_saved_recording_folder(short_gt, tmp_path):
    recording, _ = short_gt
    saved = recording.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    result = run_cli("sort", str(tmp_path / "rec"), "--folder", str(tmp_path / "out"),
                     "--param", "train_steps=100", "--param", "device=cpu")
    assert result.returncode == 0, result.stderr
    assert "units" in result.stdout
    from spikeinterface.sorters import read_sorter_folder

    sorting = read_sorter_folder(tmp_path / "out")
    assert sorting.get_num_units() > 0
    assert sorting.get_num_segments() == saved.get_num_segments()


def test_sort_bad_parameter_is_a_clear_error(short_gt, tmp_path):
    recording, _ = short_gt
    recording.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    result = run_cli("sort", str(tmp_path / "rec"), "--folder", str(tmp_path / "out"), "--param", "nope=1")
    assert result.returncode == 2
    assert "Unknown accm parameter" in result.stderr
    assert "Traceback" not in result.stderr


def test_sort_unknown_format(tmp_path):
    (tmp_path / "weird.xyz").write_text("x")
    result = run_cli("sort", str(tmp_path / "weird.xyz"))
    assert result.returncode != 0
    assert "cannot tell the format" in result.stderr


def test_demo_prints_the_score(tmp_path):
    result = run_cli("demo", "--scenario", "small8", "--duration", "12", "--seed", "3", "--folder",
                     str(tmp_path / "demo"), "--param", "train_steps=150")
    assert result.returncode == 0, result.stderr
    assert "well-detected units (accuracy >= 0.8):" in result.stdout
    well = int(result.stdout.split("well-detected units (accuracy >= 0.8):")[1].split("/")[0])
    assert well >= 3, result.stdout
    assert np.isfinite(float(result.stdout.split("mean accuracy:")[1].split()[0]))


def test_sort_with_labels_and_encoder(short_gt, sorted_small, tmp_path):
    from spikeinterface.core import NumpySorting

    recording, gt = short_gt
    recording.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    unit = gt.unit_ids[0]
    NumpySorting.from_unit_dict([{unit: gt.get_unit_spike_train(unit)[::5]}], gt.sampling_frequency).save(
        folder=tmp_path / "curated")
    _, previous_run = sorted_small
    result = run_cli("sort", str(tmp_path / "rec"), "--folder", str(tmp_path / "out"), "--labels",
                     str(tmp_path / "curated"), "--encoder", str(previous_run), "--param", "pretrained_train_steps=20")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "out" / "sorter_output" / "accm.log").read_text()
    assert "labels: 1 curated units" in log and "starting from pretrained encoder" in log
