"""Ground-truth benchmarking: run sorters on cached scenarios and score them with SpikeInterface.

Every sorter runs in its own process (so one crash or memory blow-up cannot take the others
down) under a timeout, while this process samples the resident memory of the whole process
tree. Scores come from ``spikeinterface.comparison.compare_sorter_to_ground_truth``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WELL_DETECTED_ACCURACY = 0.8

WORKER = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import spikeinterface.core as sc
import spikeinterface.sorters as ss
try:
    import accm_sorter  # noqa: F401
except Exception:
    pass
args = json.loads(sys.argv[1])
recording = sc.load(args["recording"])
ss.run_sorter(args["sorter"], recording, folder=args["folder"], remove_existing_folder=True,
              verbose=False, **args["params"])
"""


@dataclass
class BenchmarkRow:
    scenario: str
    sorter: str
    status: str = "ok"
    well_detected: int = 0
    num_gt_units: int = 0
    num_units: int = 0
    mean_accuracy: float = float("nan")
    median_accuracy: float = float("nan")
    mean_precision: float = float("nan")
    mean_recall: float = float("nan")
    false_positive_units: int = 0
    redundant_units: int = 0
    overmerged_units: int = 0
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    peak_rss_mib: float = float("nan")
    params: dict = field(default_factory=dict)

    def cell(self) -> str:
        if self.status != "ok":
            return self.status
        return (f"{self.well_detected}/{self.num_gt_units} a{self.mean_accuracy:.2f} "
                f"{self.wall_s:.0f}s {self.peak_rss_mib / 1024:.1f}G")


def tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(sorter: str, recording_folder: Path, output_folder: Path, params: dict, timeout_s: float):
    """Run one sorter in a child process; return (status, wall_s, cpu_s, peak_rss_bytes)."""
    payload = json.dumps(dict(sorter=sorter, recording=str(recording_folder), folder=str(output_folder),
                              params=params))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    log_path = Path(str(output_folder) + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, payload], stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        status = "ok"
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                status = f"timeout ({timeout_s:.0f} s)"
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if status == "ok" and proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        status = f"failed: {tail[0][:160]}"
    return status, wall, cpu, peak


def score(gt_sorting, sorting, row: BenchmarkRow) -> BenchmarkRow:
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    comparison = compare_sorter_to_ground_truth(gt_sorting, sorting, exhaustive_gt=True)
    perf = comparison.get_performance()
    row.well_detected = int((perf["accuracy"] >= WELL_DETECTED_ACCURACY).sum())
    row.num_gt_units = int(gt_sorting.get_num_units())
    row.num_units = int(sorting.get_num_units())
    row.mean_accuracy = float(perf["accuracy"].mean())
    row.median_accuracy = float(perf["accuracy"].median())
    row.mean_precision = float(perf["precision"].mean())
    row.mean_recall = float(perf["recall"].mean())
    row.false_positive_units = int(comparison.count_false_positive_units())
    row.redundant_units = int(comparison.count_redundant_units())
    row.overmerged_units = int(comparison.count_overmerged_units())
    return row


def benchmark(scenarios, sorters, duration, seed, output_folder, timeout_s=1800.0, sorter_params=None,
              progress=print) -> list[BenchmarkRow]:
    """Run every sorter on every scenario; write results.json/csv/md in ``output_folder``."""
    import spikeinterface.sorters as ss

    import accm_sorter  # noqa: F401
    from .scenarios import generate_scenario

    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    sorter_params = sorter_params or {}
    installed = set(ss.installed_sorters())
    rows = []
    for scenario in scenarios:
        data_folder = output_folder / "data" / f"{scenario}_{duration:g}s_seed{seed}"
        _, gt = generate_scenario(scenario, duration=duration, seed=seed, folder=data_folder)
        for sorter in sorters:
            name, params = sorter, dict(sorter_params.get(sorter, {}))
            row = BenchmarkRow(scenario=scenario, sorter=name, params=params)
            if sorter not in installed:
                row.status = "failed: not installed"
                rows.append(row)
                progress(f"[{scenario}] {sorter}: not installed")
                continue
            progress(f"[{scenario}] {sorter}: running ...")
            out = output_folder / "runs" / scenario / sorter
            row.status, row.wall_s, row.cpu_s, peak = run_measured(sorter, data_folder / "recording", out, params,
                                                                   timeout_s)
            row.peak_rss_mib = peak / 2**20
            if row.status == "ok":
                try:
                    score(gt, ss.read_sorter_folder(out), row)
                except Exception as err:  # a sorter that wrote unreadable output
                    row.status = f"failed: {type(err).__name__}: {str(err)[:120]}"
            progress(f"[{scenario}] {sorter}: {row.cell()} (cpu {row.cpu_s:.0f} s)")
            rows.append(row)
            write_results(rows, output_folder)
    return rows


def write_results(rows, output_folder: Path):
    records = [asdict(r) for r in rows]
    (output_folder / "results.json").write_text(json.dumps(records, indent=1, default=float))
    keys = [k for k in records[0] if k != "params"] if records else []
    lines = [",".join(keys)] + [",".join(str(rec[k]) for k in keys) for rec in records]
    (output_folder / "results.csv").write_text("\n".join(lines) + "\n")
    (output_folder / "results.md").write_text(markdown_table(rows))


def markdown_table(rows) -> str:
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    sorters = list(dict.fromkeys(r.sorter for r in rows))
    cells = {(r.scenario, r.sorter): r.cell() for r in rows}
    lines = ["| scenario | " + " | ".join(sorters) + " |", "|---|" + "---|" * len(sorters)]
    for s in scenarios:
        lines.append(f"| {s} | " + " | ".join(cells.get((s, so), "–") for so in sorters) + " |")
    return "\n".join(lines) + "\n\nCell = well-detected (accuracy >= 0.8) / GT units, a = mean accuracy, wall time, " \
                              "peak RSS of the sorter's process tree.\n"


def encoder_throughput(sorter_output_folder: Path, num_spikes: int = 200_000, batch_size: int = 8192,
                       device: str = "cpu") -> float:
    """Spikes per second through a trained accm encoder (inference only)."""
    import torch

    from .model import SpikeEncoder
    from .train import embed

    meta = json.loads((Path(sorter_output_folder) / "encoder.json").read_text())
    encoder = SpikeEncoder(meta["num_channels"], meta["num_samples"], meta["embedding_dim"])
    encoder.load_state_dict(torch.load(Path(sorter_output_folder) / "encoder.pt", weights_only=True))
    encoder.to(device)
    snippets = np.random.default_rng(0).normal(size=(num_spikes, meta["num_channels"], meta["num_samples"]))
    snippets = snippets.astype("float32")
    embed(encoder, snippets[:batch_size], torch.device(device), batch_size)  # warm-up
    t0 = time.perf_counter()
    embed(encoder, snippets, torch.device(device), batch_size)
    return num_spikes / (time.perf_counter() - t0)


def main_benchmark(args) -> int:
    scenarios = [s for s in args.scenarios.split(",") if s]
    sorters = [s for s in args.sorters.split(",") if s]
    n_jobs = os.cpu_count() or 1
    rows = benchmark(scenarios, sorters, args.duration, args.seed, args.output, timeout_s=args.timeout,
                     sorter_params={s: {"job_kwargs": {"n_jobs": n_jobs}} for s in ("accm",)})
    print()
    print(markdown_table(rows))
    return 0
