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
    assert (out / "results.csv").read_text().count("\n") == 4
    for figure in ("accuracy_small8.png", "time_memory.png"):
        assert (out / figure).stat().st_size > 10_000
    assert "[small8] accm: running" in result.stdout
