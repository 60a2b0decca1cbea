"""Ground-truth benchmarking: run sorters on cached scenarios and score them with SpikeInterface.

Every sorter runs in its own process (so one crash or memory blow-up cannot take the others
down) under a timeout, while this process samples the resident memory of the whole process
tree. Scores come from ``spikeinterface.comparison.compare_sorter_to_ground_truth``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WELL_DETECTED_ACCURACY = 0.8
# "sorter:variant" runs a sorter with extra parameters, e.g. tridesclous2:mc
VARIANTS = {
    "mc": {"apply_motion_correction": True},
    "nocar": {"do_CAR": False},
    "cpu": {"torch_device": "cpu"},
}
# "accm:<ablation>" runs accm with one part of the method switched off by its parameters, so the
# benchmark measures what that part contributes (docs/benchmarks.md, "Ablation").
ABLATIONS = {
    # collisions seen in training: no spike of another unit is added to a view
    "no-overlap-augment": {"aug_overlap_prob": 0.0},
    # drift tolerance of the embedding: views keep their main channel and all their channels
    "no-spatial-augment": {"aug_spatial_jitter_ratio": 1.0, "aug_channel_dropout": 0.0},
    # overlapping spikes are not peeled, masked spikes not searched, hidden spikes not matched, unfitted spikes not
    # refitted with their overlapping neighbours, copies kept
    "no-overlap-resolution": {"resolve_overlaps": False, "masked_spike_threshold": 1.0, "hidden_spike_passes": 0,
                              "refit_unfitted_spikes": False, "drop_copied_spikes": False},
    # the detected, classified spikes are the result: no template matching (nor anything after it)
    "no-matching": {"matching_method": "none"},
    # no units are looked for on the residual of matching
    "no-discovery": {"discover_units": False, "discover_small_units": False},
    # the traces are not motion-corrected
    "no-motion": {"motion_correction": "off"},
    # no unit is split: neither the clustered units nor the matched ones, nor by their amplitudes or peeled waveforms
    "no-splits": {"split_max_similarity": 0.0, "split_matched_units": False, "split_by_amplitude": False,
                  "split_peeled_units": False},
    # the spikes of units with alike templates stay where matching put them
    "no-reassign": {"reassign_alike_units": False},
    # no unit is merged: neither by the pairwise classifier nor as a duplicate or a drift piece
    "no-merges": {"merge_threshold": 1.0, "duplicate_min_similarity": 1.0, "join_drift_splits": False},
}
COLLISION_LAG_MS = 1.0
COLLISION_DISTANCE_UM = 50.0

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
    collision_recall: float = float("nan")
    isolated_recall: float = float("nan")
    false_positive_units: int = 0
    redundant_units: int = 0
    overmerged_units: int = 0
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    peak_rss_mib: float = float("nan")
    params: dict = field(default_factory=dict)
    data_folder: str = ""

    def cell(self) -> str:
        if self.status != "ok":
            return self.status
        return (f"{self.well_detected}/{self.num_gt_units} a{self.mean_accuracy:.2f} n{self.collision_recall:.2f} "
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
        status = f"failed: {failure_reason(output_folder, log_path)}"
    return status, wall, cpu, peak


def failure_reason(output_folder: Path, log_path: Path) -> str:
    """The root cause of a failed run: the last line of the sorter's own error trace if it left one."""
    si_log = Path(output_folder) / "spikeinterface_log.json"
    lines = []
    if si_log.exists():
        try:
            lines = [line.strip() for line in json.loads(si_log.read_text()).get("error_trace", []) if line.strip()]
        except (json.JSONDecodeError, AttributeError):
            lines = []
    if not lines:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:200].replace("|", "/")


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
    row.collision_recall, row.isolated_recall = collision_recalls(gt_sorting, comparison)
    return row


def colliding_spikes(gt_sorting, max_lag_ms=COLLISION_LAG_MS, max_distance_um=COLLISION_DISTANCE_UM):
    """{unit_id: bool array}: does each GT spike have another unit's spike within the lag and distance?"""
    fs = gt_sorting.sampling_frequency
    lag = int(round(max_lag_ms * fs / 1000))
    return {unit: lags <= lag for unit, lags in collision_lags(gt_sorting, max_distance_um).items()}


def collision_lags(gt_sorting, max_distance_um=COLLISION_DISTANCE_UM):
    """{unit_id: int array}: for each GT spike, samples to the nearest spike of another unit within the distance."""
    locations = np.asarray(gt_sorting.get_property("gt_unit_locations"))[:, :2]
    near = np.linalg.norm(locations[:, None] - locations[None], axis=2) <= max_distance_um
    out = {}
    for seg in range(gt_sorting.get_num_segments()):
        trains = [gt_sorting.get_unit_spike_train(u, segment_index=seg) for u in gt_sorting.unit_ids]
        for i, unit in enumerate(gt_sorting.unit_ids):
            lags = np.full(trains[i].size, np.iinfo("int64").max, dtype="int64")
            for j in np.flatnonzero(near[i]):
                if j == i or trains[j].size == 0:
                    continue
                pos = np.searchsorted(trains[j], trains[i])
                before = np.abs(trains[i] - trains[j][np.clip(pos - 1, 0, trains[j].size - 1)])
                after = np.abs(trains[j][np.clip(pos, 0, trains[j].size - 1)] - trains[i])
                lags = np.minimum(lags, np.minimum(before, after))
            out.setdefault(unit, []).append(lags)
    return {u: np.concatenate(v) for u, v in out.items()}


def collision_recall_by_lag(gt_sorting, comparison, bin_ms=0.1, max_lag_ms=COLLISION_LAG_MS):
    """(bin centres in ms, recall of colliding GT spikes in each |lag| bin)."""
    fs = gt_sorting.sampling_frequency
    edges = np.arange(0.0, max_lag_ms + 1e-9, bin_ms)
    hits, totals = np.zeros(edges.size - 1), np.zeros(edges.size - 1)
    for unit, lags in collision_lags(gt_sorting).items():
        tp = np.concatenate([np.asarray(lab) for lab in comparison.get_labels1(unit)]) == "TP"
        lag_ms = lags * 1000.0 / fs
        which = np.digitize(lag_ms, edges) - 1
        ok = (which >= 0) & (which < edges.size - 1)
        np.add.at(hits, which[ok], tp[ok])
        np.add.at(totals, which[ok], 1)
    with np.errstate(invalid="ignore"):
        return (edges[:-1] + edges[1:]) / 2, hits / totals


def collision_recalls(gt_sorting, comparison) -> tuple[float, float]:
    """Recall on GT spikes that collide (another unit within 50 um and 1 ms) and on the others.

    A GT spike counts as recalled when SpikeInterface's matching labels it a true positive of the
    sorted unit matched to its GT unit.
    """
    if "gt_unit_locations" not in gt_sorting.get_property_keys():
        return float("nan"), float("nan")
    collide = colliding_spikes(gt_sorting)
    hits_c = total_c = hits_i = total_i = 0
    for unit in gt_sorting.unit_ids:
        labels = np.concatenate([np.asarray(lab) for lab in comparison.get_labels1(unit)])
        tp = labels == "TP"
        flags = collide[unit]
        hits_c, total_c = hits_c + int(tp[flags].sum()), total_c + int(flags.sum())
        hits_i, total_i = hits_i + int(tp[~flags].sum()), total_i + int((~flags).sum())
    return (hits_c / total_c if total_c else float("nan")), (hits_i / total_i if total_i else float("nan"))


def resolve_scenario(spec: str, duration, seed, output_folder):
    """A named scenario -> (name, None); a folder with recording/ and gt_sorting/ -> (its name, folder).

    Any recording + ground-truth pair SpikeInterface can load works (MEArec, hybrid recordings):
    save them as ``folder/recording`` and ``folder/gt_sorting`` (``.save(folder=...)``).
    """
    from .scenarios import SCENARIOS

    if spec in SCENARIOS:
        return spec, None
    folder = Path(spec)
    if (folder / "recording").exists() and (folder / "gt_sorting").exists():
        return folder.name, folder
    raise ValueError(
        f"Scenario '{spec}' is neither a named scenario ({', '.join(sorted(SCENARIOS))}) nor a folder holding "
        "'recording' and 'gt_sorting' (saved with .save(folder=...))."
    )


def print_progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def variant_params(sorter: str, variant: str) -> dict:
    """The parameters that ``sorter:variant`` adds ({} without a variant)."""
    if not variant:
        return {}
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    if sorter == "accm" and variant in ABLATIONS:
        return dict(ABLATIONS[variant])
    known = sorted(VARIANTS) + ([f"{name} (accm only)" for name in ABLATIONS] if sorter == "accm" else [])
    raise ValueError(f"Unknown sorter variant '{sorter}:{variant}'; known variants: {', '.join(known)}")


def benchmark(scenarios, sorters, duration, seed, output_folder, timeout_s=1800.0, sorter_params=None,
              progress=print_progress, figures=True) -> list[BenchmarkRow]:
    """Run every sorter on every scenario; write results.json/csv/md in ``output_folder``."""
    import spikeinterface.sorters as ss

    import accm_sorter  # noqa: F401
    from .scenarios import generate_scenario

    # a misspelt variant fails here, not after an hour of other runs
    extra_params = {label: variant_params(*label.partition(":")[::2]) for label in sorters}
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    sorter_params = sorter_params or {}
    installed = set(ss.installed_sorters())
    # rows from earlier invocations in the same folder are kept (a re-run replaces its own rows), so
    # sorters can be added to a benchmark one at a time
    previous = load_results(output_folder)
    rows = []

    def record(row):
        rows.append(row)
        replaced = {(r.scenario, r.sorter) for r in rows}
        write_results([r for r in previous if (r.scenario, r.sorter) not in replaced] + rows, output_folder)

    for scenario_spec in scenarios:
        scenario, data_folder = resolve_scenario(scenario_spec, duration, seed, output_folder)
        if data_folder is None:
            data_folder = output_folder / "data" / f"{scenario}_{duration:g}s_seed{seed}"
            generate_scenario(scenario, duration=duration, seed=seed, folder=data_folder)
        from spikeinterface.core import load

        gt = load(data_folder / "gt_sorting")
        for label in sorters:
            sorter = label.partition(":")[0]
            params = dict(sorter_params.get(sorter, {}))
            params.update(extra_params[label])
            row = BenchmarkRow(scenario=scenario, sorter=label, params=params, data_folder=str(data_folder))
            if sorter not in installed:
                row.status = "failed: not installed"
                record(row)
                progress(f"[{scenario}] {label}: not installed")
                continue
            progress(f"[{scenario}] {label}: running ...")
            out = output_folder / "runs" / scenario / label.replace(":", "_")
            row.status, row.wall_s, row.cpu_s, peak = run_measured(sorter, data_folder / "recording", out, params,
                                                                   timeout_s)
            row.peak_rss_mib = peak / 2**20
            if row.status == "ok":
                try:
                    score(gt, ss.read_sorter_folder(out), row)
                except Exception as err:  # a sorter that wrote unreadable output
                    row.status = f"failed: {type(err).__name__}: {str(err)[:120]}"
            progress(f"[{scenario}] {label}: {row.cell()} (cpu {row.cpu_s:.0f} s)")
            record(row)
    all_rows = load_results(output_folder)
    if figures:
        make_figures(all_rows, output_folder)
    return all_rows


def load_results(output_folder: Path) -> list[BenchmarkRow]:
    path = Path(output_folder) / "results.json"
    if not path.exists():
        return []
    return [BenchmarkRow(**record) for record in json.loads(path.read_text())]


def make_figures(rows, output_folder: Path) -> list[Path]:
    """PNG figures: accuracy vs SNR per sorter, ordered accuracy curves, time and memory bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spikeinterface.sorters as ss
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import load

    output_folder = Path(output_folder)
    written = []
    for scenario in dict.fromkeys(r.scenario for r in rows):
        ok = [r for r in rows if r.scenario == scenario and r.status == "ok"]
        if not ok:
            continue
        data = scenario_data_folder(output_folder, scenario)
        if data is None:
            continue
        gt = load(data / "gt_sorting")
        snr = ground_truth_snr(load(data / "recording"), gt)
        has_locations = "gt_unit_locations" in gt.get_property_keys()
        fig, axes = plt.subplots(1, 3 if has_locations else 2, figsize=(16 if has_locations else 11, 4))
        ax_snr, ax_ordered = axes[0], axes[1]
        for r in ok:
            sorting = ss.read_sorter_folder(output_folder / "runs" / scenario / r.sorter.replace(":", "_"))
            comparison = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
            acc = comparison.get_performance()["accuracy"].reindex(gt.unit_ids).to_numpy(dtype=float)
            ax_snr.scatter(snr, acc, label=r.sorter, s=18)
            ax_ordered.plot(np.sort(acc)[::-1], label=r.sorter)
            if has_locations:
                centres, recall = collision_recall_by_lag(gt, comparison)
                axes[2].plot(centres, recall, marker="o", ms=3, label=r.sorter)
        if has_locations:
            axes[2].set(xlabel="lag to the colliding spike (ms)", ylabel="recall",
                        title=f"{scenario}: collision recall by lag (< 50 um)")
        ax_snr.set(xlabel="GT unit SNR (peak / noise)", ylabel="accuracy", title=f"{scenario}: accuracy vs SNR")
        ax_ordered.set(xlabel="GT units (ordered)", ylabel="accuracy", title=f"{scenario}: ordered accuracy")
        ax_ordered.axhline(WELL_DETECTED_ACCURACY, color="grey", lw=0.5)
        ax_snr.legend(fontsize=8)
        fig.tight_layout()
        path = output_folder / f"accuracy_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    ok = [r for r in rows if r.status == "ok"]
    if ok:
        labels = [f"{r.scenario}\n{r.sorter}" for r in ok]
        fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6, 0.7 * len(ok)), 6))
        ax_t.bar(labels, [r.wall_s for r in ok])
        ax_t.set(ylabel="wall time (s)")
        ax_m.bar(labels, [r.peak_rss_mib / 1024 for r in ok])
        ax_m.set(ylabel="peak RSS (GiB)")
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="x", labelsize=7, rotation=90)
        fig.tight_layout()
        path = output_folder / "time_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def scenario_data_folder(output_folder: Path, scenario: str):
    recorded = [r for r in load_results(output_folder) if r.scenario == scenario and r.data_folder]
    if recorded and Path(recorded[0].data_folder).exists():
        return Path(recorded[0].data_folder)
    found = sorted((Path(output_folder) / "data").glob(f"{scenario}_*"))
    return found[0] if found else None


def ground_truth_snr(recording, gt_sorting, max_spikes=200, seed=0) -> np.ndarray:
    """Peak amplitude of each GT unit's mean waveform over the noise level of its best channel."""
    from spikeinterface.core import get_noise_levels

    fs = recording.sampling_frequency
    before, after = int(0.001 * fs), int(0.002 * fs)
    noise = get_noise_levels(recording, return_in_uV=False, random_slices_kwargs=dict(seed=seed))
    rng = np.random.default_rng(seed)
    snr = np.zeros(gt_sorting.get_num_units())
    for k, unit in enumerate(gt_sorting.unit_ids):
        train = gt_sorting.get_unit_spike_train(unit, segment_index=0)
        train = train[(train > before) & (train < recording.get_num_samples(0) - after)]
        if train.size == 0:
            continue
        train = rng.choice(train, min(max_spikes, train.size), replace=False)
        waves = np.stack([recording.get_traces(start_frame=t - before, end_frame=t + after) for t in train])
        mean = waves.astype("float64").mean(axis=0)
        mean -= np.median(mean, axis=0)
        peak = np.abs(mean).max(axis=0)
        best = int(np.argmax(peak / noise))
        snr[k] = peak[best] / noise[best]
    return snr


def machine_description() -> dict:
    """The processor, its cores, torch's CPU kernel set and the package versions a benchmark ran with.

    Torch chooses its CPU kernels by the instruction set (AVX2 or AVX-512; ``ATEN_CPU_CAPABILITY`` overrides it),
    and their rounding alone moved tetrode 2002 from 9/10 to 7/10 well detected on one machine
    (docs/method.md, "Known weaknesses"): figures are comparable only with this beside them.
    """
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        kernels = str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        kernels = "unknown"
    versions = {}
    for package in ("accm-sorter", "spikeinterface", "torch", "numpy", "numba", "hdbscan"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return dict(cpu=cpu, cores=os.cpu_count(), torch_cpu_kernels=kernels, python=platform.python_version(),
                versions=versions)


def write_results(rows, output_folder: Path):
    records = [asdict(r) for r in rows]
    (output_folder / "results.json").write_text(json.dumps(records, indent=1, default=float))
    keys = [k for k in records[0] if k not in ("params", "data_folder")] if records else []
    lines = [",".join(keys)] + [",".join(str(rec[k]) for k in keys) for rec in records]
    (output_folder / "results.csv").write_text("\n".join(lines) + "\n")
    machine = machine_description()
    (output_folder / "machine.json").write_text(json.dumps(machine, indent=1))
    packages = ", ".join(f"{name} {v}" for name, v in machine["versions"].items())
    (output_folder / "results.md").write_text(
        markdown_table(rows) + f"\nMeasured on {machine['cpu']} ({machine['cores']} cores), torch CPU kernels "
        f"{machine['torch_cpu_kernels']}, Python {machine['python']}; {packages}.\n")


def markdown_table(rows) -> str:
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    sorters = list(dict.fromkeys(r.sorter for r in rows))
    cells = {(r.scenario, r.sorter): r.cell() for r in rows}
    lines = ["| scenario | " + " | ".join(sorters) + " |", "|---|" + "---|" * len(sorters)]
    for s in scenarios:
        lines.append(f"| {s} | " + " | ".join(cells.get((s, so), "–") for so in sorters) + " |")
    return "\n".join(lines) + "\n\nCell = well-detected (accuracy >= 0.8) / GT units, a = mean accuracy, n = recall on GT " \
                              "spikes that collide with another unit within 50 um and 1 ms, wall time, peak RSS of " \
                              "the sorter's process tree.\n"


def encoder_throughput(sorter_output_folder: Path, num_spikes: int = 200_000, batch_size: int = 1024,
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
    if args.ablation:
        sorters += [label for label in ["accm"] + [f"accm:{name}" for name in ABLATIONS] if label not in sorters]
    rows = benchmark(scenarios, sorters, args.duration, args.seed, args.output, timeout_s=args.timeout)
    print()
    print(markdown_table(rows))
    return 0
