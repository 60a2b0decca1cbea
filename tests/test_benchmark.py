"""`accm-sorter benchmark` on a tiny scenario: table rows, figures, failure rows."""

import json
import subprocess
import sys

import pytest


@pytest.mark.filterwarnings("ignore")
def test_benchmark_cli_on_a_tiny_scenario(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("psutil")
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "accm_sorter.cli", "benchmark", "--scenarios", "small8", "--duration", "12",
         "--seed", "3", "--sorters", "accm,simple,no-such-sorter", "--timeout", "600", "--output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["sorter"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"accm", "simple", "no-such-sorter"}
    assert rows["no-such-sorter"]["status"] == "failed: not installed"
    for name in ("accm", "simple"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["num_gt_units"] == 8
        assert 0 <= row["well_detected"] <= 8
        assert 0.0 <= row["mean_accuracy"] <= 1.0
        assert row["wall_s"] > 0 and row["peak_rss_mib"] > 50 and row["cpu_s"] > 0
    assert rows["accm"]["well_detected"] >= 3
    table = (out / "results.md").read_text()
    assert "| small8 |" in table and "not installed" in table
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cores"] >= 1 and machine["versions"]["spikeinterface"] != "not installed"
    assert f"torch CPU kernels {machine['torch_cpu_kernels']}" in table and machine["cpu"] in table
    assert (out / "results.csv").read_text().count("\n") == 4
    for figure in ("accuracy_small8.png", "time_memory.png"):
        assert (out / figure).stat().st_size > 10_000
    assert "[small8] accm: running" in result.stdout


def test_user_scenario_by_path_and_unknown_scenario(tmp_path, short_gt):
    from accm_sorter.benchmark import resolve_scenario

    recording, gt = short_gt
    folder = tmp_path / "my_hybrid"
    recording.save(folder=folder / "recording", n_jobs=1, progress_bar=False)
    gt.save(folder=folder / "gt_sorting")
    assert resolve_scenario(str(folder), 8.0, 0, tmp_path) == ("my_hybrid", folder)
    assert resolve_scenario("probe32", 8.0, 0, tmp_path) == ("probe32", None)
    with pytest.raises(ValueError, match="neither a named scenario"):
        resolve_scenario(str(tmp_path / "nothing"), 8.0, 0, tmp_path)


def test_collision_recall_by_lag_counts_every_colliding_spike(short_gt):
    import numpy as np
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    from accm_sorter.benchmark import collision_recall_by_lag, collision_recalls, colliding_spikes

    _, gt = short_gt
    comparison = compare_sorter_to_ground_truth(gt, gt, exhaustive_gt=True)  # a perfect sorter
    centres, recall = collision_recall_by_lag(gt, comparison)
    assert centres.size == 10
    assert np.all(recall[np.isfinite(recall)] == 1.0)
    assert collision_recalls(gt, comparison) == (1.0, 1.0)
    assert sum(int(f.sum()) for f in colliding_spikes(gt).values()) > 0


def test_every_ablation_switches_something_off_with_valid_parameters():
    from accm_sorter.benchmark import ABLATIONS, variant_params
    from accm_sorter.params import default_params, validate_params

    defaults = default_params()
    for name, switches in ABLATIONS.items():
        params = validate_params(variant_params("accm", name))
        changed = {key for key in switches if params[key] != defaults[key]}
        assert changed == set(switches), (name, switches)


def test_a_misspelt_variant_is_refused_before_anything_runs(tmp_path):
    from accm_sorter.benchmark import benchmark

    with pytest.raises(ValueError, match="known variants: .*no-matching \\(accm only\\)"):
        benchmark(["probe32"], ["accm", "accm:no-matchin"], 10.0, 0, tmp_path, figures=False)
    with pytest.raises(ValueError, match="'lupin:no-matching'"):
        benchmark(["probe32"], ["lupin:no-matching"], 10.0, 0, tmp_path, figures=False)
    assert not any(tmp_path.iterdir())
