"""accm on a 384-channel Neuropixels-like probe: wall time, CPU time and peak memory at 2 and 10 min.

    python benchmarks/scale_384ch.py [--durations 120,600] [--num-units 100] [--seed 2002]
                                     [--out /tmp/accm_scale_384ch] [--n-jobs 2] [--keep] [--timeout 4200]

Recording: SpikeInterface's generator, lazy (nothing is written to disk but the ground-truth spike
trains and the unit templates): 384 channels in 4 staggered columns (x = 0/16/32/48 um, 20 um
between rows, NP1.0-like: 3.84 mm deep), 100 units firing 2-8 Hz, 5 uV noise, 30 kHz,
upsample_factor=4, seeded. The same seed gives the same units (locations, templates) at every
duration.

Each duration is sorted with ``run_sorter("accm", ...)`` and accm's default parameters (plus
``job_kwargs={"n_jobs": N}``) in its own fresh Python process. While it runs, this process samples
the memory of that process and all its children every 0.2 s: the summed RSS (as
``accm_sorter.benchmark`` measures it, the headline figure) and, every 1 s, the summed PSS with its
anonymous / file-backed / shared-memory parts from /proc/PID/smaps_rollup (PSS splits pages shared
between processes, e.g. by the forked SpikeInterface workers, instead of counting them once per
process). The samples are aligned with the timestamped "stage X ..." lines of sorter_output/accm.log
to give the memory of every stage.

Prints figures and PASS/FAIL against the targets (peak RSS < 8 GiB; peak at the longest duration
< 1.5 x the peak at the shortest; encoder inference >= 100,000 spikes/s on CPU), and writes
summary.json, summary.md, the memory timelines and copies of the accm logs into --out. Asserts
nothing: the machines are shared, so read the figures of one run together.
"""

from __future__ import annotations

__version__ = "0.1.0"  # SpikeInterface records the version of the module defining a serialized extractor

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from spikeinterface.core.generate import InjectTemplatesRecording

GIB = 2**30
SAMPLING_FREQUENCY = 30000.0
FIRING_RATES = (2.0, 8.0)
NOISE_UV = 5.0
UPSAMPLE_FACTOR = 4
RSS_TARGET_GIB = 8.0
RATIO_TARGET = 1.5
INFERENCE_TARGET = 100_000
SAMPLE_PERIOD_S = 0.2
CODE_PATH: list[str] = []  # where the children import accm_sorter from first (the frozen copy, if any)
PSS_EVERY = 5  # PSS (smaps_rollup walks the page tables) every 5th sample, i.e. every 1 s

WORKER = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
args = json.loads(sys.argv[1])
import scale_384ch  # noqa: F401  defines the recording class loaded below
import accm_sorter  # noqa: F401  registers "accm"
import spikeinterface.core as sc
import spikeinterface.sorters as ss
recording = sc.load(args["recording"])
print(f"{time.strftime('%H:%M:%S')} child: accm from {accm_sorter.__file__}; {recording}", flush=True)
ss.run_sorter("accm", recording, folder=args["folder"], remove_existing_folder=True, verbose=False,
              **args["params"])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
with open(args["rusage"], "w") as f:
    json.dump(dict(self_maxrss_kib=me.ru_maxrss, children_maxrss_kib=kids.ru_maxrss,
                   self_cpu_s=me.ru_utime + me.ru_stime, children_cpu_s=kids.ru_utime + kids.ru_stime), f)
print(f"{time.strftime('%H:%M:%S')} child: done", flush=True)
"""


# --- the lazy, serializable ground-truth recording ---------------------------------------------

class FileTemplatesRecording(InjectTemplatesRecording):
    """``InjectTemplatesRecording`` that keeps its templates in a .npy file instead of its kwargs.

    SpikeInterface's own class stores ``templates.tolist()`` in its kwargs: with 384 channels, 100
    units and upsample_factor=4 that is 18 M Python floats, about 1 GiB and 3 s every time the
    recording is built (measured), in the sorting process and again in every process that reloads
    it. That memory belongs to the generator, not to the sorter, so this class builds the same
    segments without it: the kwargs hold only the file paths and the templates are memory-mapped.
    """

    def __init__(self, sorting, parent_recording, templates_file_path, upsample_vector_file_path=None, nbefore=None):
        from spikeinterface.core import BaseRecording
        from spikeinterface.core.generate import InjectTemplatesRecordingSegment

        templates = np.load(templates_file_path, mmap_mode="r")
        upsample_vector = None if upsample_vector_file_path is None else np.load(upsample_vector_file_path)
        if nbefore is None:
            nbefore = int(np.argmax(np.max(np.abs(templates), axis=(0, 2)), axis=0))
        self.templates = templates
        BaseRecording.__init__(self, sorting.get_sampling_frequency(), parent_recording.channel_ids,
                               parent_recording.dtype)
        assert templates.shape[0] == sorting.get_num_units() and templates.shape[2] == parent_recording.get_num_channels()
        self.spike_vector = sorting.to_spike_vector()
        if templates.ndim == 4:
            assert upsample_vector is not None and upsample_vector.shape == self.spike_vector.shape
        parent_recording.copy_metadata(self)
        for segment_index in range(sorting.get_num_segments()):
            start = np.searchsorted(self.spike_vector["segment_index"], segment_index, side="left")
            end = np.searchsorted(self.spike_vector["segment_index"], segment_index, side="right")
            self.add_recording_segment(InjectTemplatesRecordingSegment(
                self._sampling_frequency, self.dtype, self.spike_vector[start:end], templates, nbefore, None,
                None if upsample_vector is None else upsample_vector[start:end],
                parent_recording.segments[segment_index], parent_recording.get_num_frames(segment_index),
            ))
        if not (sorting.check_serializability("json") and parent_recording.check_serializability("json")):
            self._serializability["json"] = False
        self._kwargs = dict(sorting=sorting, parent_recording=parent_recording,
                            templates_file_path=str(templates_file_path),
                            upsample_vector_file_path=None if upsample_vector_file_path is None
                            else str(upsample_vector_file_path),
                            nbefore=int(nbefore))


def neuropixels_like_probe():
    """384 contacts in 4 staggered columns like Neuropixels 1.0: 2 per row, rows 20 um apart."""
    from probeinterface import generate_multi_columns_probe

    probe = generate_multi_columns_probe(num_columns=4, num_contact_per_column=96, xpitch=16.0, ypitch=40.0,
                                         y_shift_per_column=[20.0, 0.0, 20.0, 0.0], contact_shapes="square",
                                         contact_shape_params={"width": 12.0})
    probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
    return probe


def make_recording(duration: float, num_units: int, seed: int, folder: Path):
    """Write the ground truth (spike trains, templates) into ``folder``; return (lazy recording, GT sorting)."""
    from spikeinterface.core import generate_ground_truth_recording, load

    folder.mkdir(parents=True, exist_ok=True)
    probe = neuropixels_like_probe()
    generated, gt = generate_ground_truth_recording(
        durations=[duration], sampling_frequency=SAMPLING_FREQUENCY, probe=probe, num_units=num_units,
        generate_sorting_kwargs=dict(firing_rates=FIRING_RATES, refractory_period_ms=4.0),
        noise_kwargs=dict(noise_levels=NOISE_UV, strategy="on_the_fly"),
        generate_unit_locations_kwargs=dict(margin_um=10.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=20.0),
        upsample_factor=UPSAMPLE_FACTOR, seed=seed,
    )
    kwargs = generated._kwargs
    templates_file = folder / "templates.npy"
    np.save(templates_file, np.asarray(generated.templates, dtype="float32"))
    upsample_file = None
    if kwargs.get("upsample_vector") is not None:
        upsample_file = folder / "upsample_vector.npy"
        np.save(upsample_file, np.asarray(kwargs["upsample_vector"]))
    gt_folder = folder / "gt_sorting"
    if gt_folder.exists():
        shutil.rmtree(gt_folder)
    with warnings.catch_warnings():
        # a generated NumpySorting has no provenance to save; SpikeInterface says so on every save
        warnings.filterwarnings("ignore", message="The extractor is not serializable")
        gt.save(folder=gt_folder)  # a NumpySorting cannot be serialized; the saved folder can
    gt = load(gt_folder)
    recording = FileTemplatesRecording(gt, kwargs["parent_recording"], templates_file, upsample_file,
                                       nbefore=kwargs["nbefore"])
    recording.set_probe(probe)  # in place in SpikeInterface >= 0.105
    recording.set_channel_gains(1.0)
    recording.set_channel_offsets(0.0)
    recording.annotate(is_filtered=False)
    del generated
    return recording, gt


# --- memory sampling ----------------------------------------------------------------------------

def tree_processes(pid: int):
    import psutil

    try:
        parent = psutil.Process(pid)
        return [parent] + parent.children(recursive=True)
    except psutil.Error:
        return []


def smaps_rollup(pid: int) -> dict:
    """Rss/Pss and the anonymous, file-backed and shared-memory parts of Pss, in bytes."""
    wanted = {"Rss:", "Pss:", "Pss_Anon:", "Pss_File:", "Pss_Shmem:"}
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in wanted:
                    out[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def sample_memory(pid: int, with_pss: bool) -> dict:
    from accm_sorter.benchmark import tree_rss_bytes  # the project's own process-tree RSS

    row = dict(t=time.time(), rss=tree_rss_bytes(pid), load1=os.getloadavg()[0])
    procs = tree_processes(pid)
    row["nproc"] = len(procs)
    try:
        row["main_rss"] = procs[0].memory_info().rss if procs else 0
    except Exception:
        row["main_rss"] = 0
    if with_pss:
        total = dict(pss=0, pss_anon=0, pss_file=0, pss_shmem=0)
        segments = {}
        for proc in procs:
            r = smaps_rollup(proc.pid)
            total["pss"] += r.get("Pss", 0)
            total["pss_anon"] += r.get("Pss_Anon", 0)
            total["pss_file"] += r.get("Pss_File", 0)
            total["pss_shmem"] += r.get("Pss_Shmem", 0)
            segments.update(shared_memory_segments(proc.pid))
        total["shm"] = sum(segments.values())
        # what the run holds in RAM: private + file pages (PSS) plus every shared-memory segment it has
        # mapped, whole: tmpfs pages stay in RAM once written even where no process has touched them
        # since (RSS and PSS count only the touched ones)
        total["footprint"] = total["pss"] - total["pss_shmem"] + total["shm"]
        row.update(total)
    return row


def shared_memory_segments(pid: int) -> dict:
    """{path: bytes held} of the /dev/shm segments (multiprocessing.shared_memory) mapped by a process."""
    out = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/dev/shm/" not in line:
                    continue
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].strip()
                try:  # the pages the segment really holds (tmpfs allocates on write)
                    size = os.stat(path).st_blocks * 512
                except OSError:  # unlinked already: count the mapping
                    size = end - start
                out[path] = max(out.get(path, 0), size)
    except (OSError, IndexError, ValueError):
        pass
    return out


def kill_tree(pid: int) -> None:
    for proc in reversed(tree_processes(pid)):  # children first; all of them were started by this run
        try:
            proc.kill()
        except Exception:
            pass


def run_child(recording_json: Path, run_folder: Path, params: dict, timeout_s: float, log_path: Path):
    """Sort in a fresh process; return (status, wall_s, cpu_s, samples, rusage_from_child, cache_seen)."""
    rusage_file = run_folder.parent / (run_folder.name + "_rusage.json")
    rusage_file.unlink(missing_ok=True)
    payload = json.dumps(dict(recording=str(recording_json), folder=str(run_folder), params=params,
                              rusage=str(rusage_file)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(CODE_PATH + [str(Path(__file__).resolve().parent)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    samples, status, cache_seen = [], "ok", set()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # cwd outside the checkout: "python -c" puts the cwd first on sys.path, ahead of PYTHONPATH
        proc = subprocess.Popen([sys.executable, "-c", WORKER, payload], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=run_folder.parent)
        k = 0
        while proc.poll() is None:
            samples.append(sample_memory(proc.pid, with_pss=(k % PSS_EVERY == 0)))
            if (run_folder / "sorter_output" / "preprocessed").exists():
                cache_seen.add("folder")
            k += 1
            if time.perf_counter() - t0 > timeout_s:
                kill_tree(proc.pid)
                proc.wait()
                status = f"timeout ({timeout_s:.0f} s)"
                break
            time.sleep(SAMPLE_PERIOD_S)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if status == "ok" and proc.returncode != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        status = f"failed (rc {proc.returncode}): {lines[-1][:200] if lines else 'no output'}"
    child_rusage = json.loads(rusage_file.read_text()) if rusage_file.exists() else {}
    return status, wall, cpu, samples, child_rusage, cache_seen


# --- reading accm's outputs -----------------------------------------------------------------------

def parse_accm_log(path: Path):
    """[(epoch_s, message)] from accm.log ("YYYY-mm-dd HH:MM:SS,mmm message")."""
    events = []
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        try:
            stamp, ms_msg = line[:19], line[20:]
            ms, msg = ms_msg[:3], ms_msg[4:]
            t = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        except ValueError:
            continue
        events.append((t, msg))
    return events


def stage_intervals(events, t_start, t_end):
    """[(name, t0, t1)]: child start-up, every accm stage, then the end (writing, exit)."""
    intervals, current, t_current = [], "start-up (imports, load, run_sorter set-up)", t_start
    for t, msg in events:
        if msg.startswith("stage ") and msg.endswith(" ..."):
            if current is not None:
                intervals.append((current, t_current, t))
            current, t_current = msg[len("stage "):-len(" ...")], t
        elif msg.startswith("stage ") and " done in " in msg and current is not None:
            intervals.append((current, t_current, t))
            current, t_current = None, t
    if current is None:
        current = "after the last stage (run_sorter wrap-up, exit)"
    intervals.append((current, t_current, t_end))
    return [iv for iv in intervals if iv[2] >= iv[1]]


def memory_by_stage(samples, intervals):
    rows = []
    for name, t0, t1 in intervals:
        # the samples inside the stage, plus the last one before it (a stage shorter than the
        # sampling period still gets the memory it started with)
        before = [s for s in samples if s["t"] < t0][-1:]
        inside = before + [s for s in samples if t0 <= s["t"] <= t1]
        pss = [s for s in inside if "pss" in s]
        row = dict(stage=name, seconds=t1 - t0)
        if inside:
            peak = max(inside, key=lambda s: s["rss"])
            row.update(rss_start_gib=inside[0]["rss"] / GIB, rss_end_gib=inside[-1]["rss"] / GIB,
                       rss_peak_gib=peak["rss"] / GIB, main_rss_peak_gib=max(s["main_rss"] for s in inside) / GIB,
                       max_procs=max(s["nproc"] for s in inside))
        if pss:
            top = max(pss, key=lambda s: s["pss"])
            row.update(pss_peak_gib=top["pss"] / GIB, pss_anon_gib=top["pss_anon"] / GIB,
                       pss_file_gib=top["pss_file"] / GIB, pss_shmem_gib=top["pss_shmem"] / GIB,
                       footprint_peak_gib=max(s.get("footprint", 0) for s in pss) / GIB,
                       shm_peak_gib=max(s.get("shm", 0) for s in pss) / GIB)
        rows.append(row)
    return rows


def annotate_log(events, samples):
    """Every accm.log line with the tree RSS when it was written and the peak since the previous line."""
    out, previous = [], samples[0]["t"] if samples else 0.0
    for t, msg in events:
        window = [s["rss"] for s in samples if previous <= s["t"] <= t]
        at = [s["rss"] for s in samples if s["t"] <= t]
        out.append(dict(t=t, message=msg, rss_gib=(at[-1] / GIB) if at else float("nan"),
                        peak_since_previous_gib=(max(window) / GIB) if window else float("nan")))
        previous = t
    return out


def find_number(events, suffix):
    for _, msg in events:
        if msg.endswith(suffix):
            try:
                return float(msg.split()[0].replace(",", ""))
            except ValueError:
                pass
    return float("nan")


def log_value(events, prefix, position=0):
    for _, msg in events:
        if msg.startswith(prefix):
            try:
                return float(msg[len(prefix):].split()[position].replace(",", ""))
            except (ValueError, IndexError):
                pass
    return float("nan")


def freeze_code(out: Path) -> Path:
    """Copy the accm_sorter package into ``out/accm_code`` and return that folder.

    Both durations then run the same code even while the working tree is being edited (a sort
    imports some accm modules only when it reaches their stage, up to an hour after it started).
    The copy is retried until it imports cleanly (a file caught mid-edit can break the import).
    """
    import importlib.util

    source = Path(importlib.util.find_spec("accm_sorter").origin).resolve().parent
    target_root = out / "accm_code"
    for attempt in range(10):
        shutil.rmtree(target_root, ignore_errors=True)
        shutil.copytree(source, target_root / "accm_sorter", ignore=shutil.ignore_patterns("__pycache__"))
        check = subprocess.run(
            [sys.executable, "-c", "import accm_sorter, accm_sorter.pipeline, accm_sorter.params, "
             "accm_sorter.sorter; print(accm_sorter.__file__)"],
            cwd=out, env=dict(os.environ, PYTHONPATH=str(target_root)), capture_output=True, text=True)
        if check.returncode == 0 and str(target_root) in check.stdout:
            return target_root
        time.sleep(5)
    raise RuntimeError(f"could not take an importable copy of {source}: {check.stderr[-500:]}")


def code_state(package: Path | None = None) -> dict:
    """Which accm was measured: git HEAD, uncommitted changes under accm_sorter/, a hash of its sources,
    and the defaults that decide the heavy stages (the pipeline changes while benchmarks run)."""
    import hashlib

    import accm_sorter
    from accm_sorter.params import default_params

    package = Path(package or Path(accm_sorter.__file__).resolve().parent)
    digest = hashlib.sha1()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    state = dict(accm_sources_sha1=digest.hexdigest()[:12])
    state["package"] = str(package)
    try:
        root = Path(__file__).resolve().parent.parent  # the checkout this script belongs to
        state["git_head"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
        state["uncommitted"] = [line[3:] for line in subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "accm_sorter"],
            capture_output=True, text=True).stdout.splitlines()]
    except OSError:
        pass
    defaults = default_params()
    state["defaults"] = {k: defaults[k] for k in ("motion_correction", "motion_preset", "cache_preprocessing",
                                                  "detection_method", "resolve_overlaps", "masked_spike_threshold",
                                                  "matching_method") if k in defaults}
    return state


# --- one duration ---------------------------------------------------------------------------------

def run_duration(duration: float, args, out: Path) -> dict:
    import psutil
    import spikeinterface.sorters as ss

    import accm_sorter  # noqa: F401
    from accm_sorter.benchmark import BenchmarkRow, score

    tag = f"{duration:g}s"
    data_folder = out / f"data_{tag}"
    run_folder = out / f"run_{tag}"
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} [{tag}] generating the lazy 384-channel recording ...", flush=True)
    recording, gt = make_recording(duration, args.num_units, args.seed, data_folder)
    recording_json = data_folder / "recording.json"
    recording.dump_to_json(recording_json)
    info = dict(duration_s=duration, num_channels=recording.get_num_channels(), num_units_gt=int(gt.get_num_units()),
                gt_spikes=int(gt.count_total_num_spikes()),
                float32_traces_gib=recording.get_num_samples(0) * recording.get_num_channels() * 4 / GIB,
                available_ram_gib_at_start=psutil.virtual_memory().available / GIB)
    del recording
    params = dict(job_kwargs=dict(n_jobs=args.n_jobs))
    print(f"{time.strftime('%H:%M:%S')} [{tag}] sorting with accm in a fresh process (n_jobs={args.n_jobs}; "
          f"{info['float32_traces_gib']:.1f} GiB of float32 traces, {info['available_ram_gib_at_start']:.1f} GiB "
          f"RAM available) ...", flush=True)
    t_start = time.time()
    status, wall, cpu, samples, child_rusage, cache_seen = run_child(
        recording_json, run_folder, params, args.timeout, out / f"child_{tag}.log")
    t_end = time.time()
    sorter_output = run_folder / "sorter_output"
    events = parse_accm_log(sorter_output / "accm.log")
    timings = {}
    if (sorter_output / "timings.json").exists():
        timings = json.loads((sorter_output / "timings.json").read_text())
    pss_samples = [s for s in samples if "pss" in s]
    peak_pss = max(pss_samples, key=lambda s: s["pss"]) if pss_samples else {}
    result = dict(
        info, status=status, wall_s=wall, cpu_s=cpu,
        mean_load_1min=float(np.mean([s["load1"] for s in samples])) if samples else float("nan"),
        peak_rss_gib=max((s["rss"] for s in samples), default=0) / GIB,
        peak_main_rss_gib=max((s["main_rss"] for s in samples), default=0) / GIB,
        peak_pss_gib=peak_pss.get("pss", 0) / GIB,
        peak_pss_parts_gib={k: peak_pss.get(k, 0) / GIB for k in ("pss_anon", "pss_file", "pss_shmem")},
        peak_footprint_gib=max((s.get("footprint", 0) for s in pss_samples), default=0) / GIB,
        peak_shm_gib=max((s.get("shm", 0) for s in pss_samples), default=0) / GIB,
        max_processes=max((s["nproc"] for s in samples), default=0),
        ru_maxrss_child_gib=child_rusage.get("self_maxrss_kib", float("nan")) * 1024 / GIB,
        ru_maxrss_grandchildren_gib=child_rusage.get("children_maxrss_kib", float("nan")) * 1024 / GIB,
        ru_maxrss_all_children_so_far_gib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB,
        preprocessing_cache="folder" if "folder" in cache_seen else
        ("memory" if max((s.get("pss_shmem", 0) for s in samples), default=0) > 0.5 * info["float32_traces_gib"] * GIB
         else "none/unknown"),
        timings_s=timings,
        spikes_detected=find_number(events, "spikes detected"),
        residual_peaks=log_value(events, "residual detection: "),
        inference_log_spikes_per_s=log_value(events, "encoder inference "),
    )
    meta_file = sorter_output / "encoder.json"
    result["inference_spikes_per_s"] = (json.loads(meta_file.read_text()).get("inference_spikes_per_s", float("nan"))
                                        if meta_file.exists() else float("nan"))
    result["stages"] = memory_by_stage(samples, stage_intervals(events, t_start, t_end))
    result["annotated_log"] = annotate_log(events, samples)
    if status == "ok":
        row = score(gt, ss.read_sorter_folder(run_folder), BenchmarkRow(scenario=f"np384_{tag}", sorter="accm"))
        result.update(num_units=row.num_units, well_detected=row.well_detected, num_gt_units=row.num_gt_units,
                      mean_accuracy=row.mean_accuracy, median_accuracy=row.median_accuracy,
                      mean_precision=row.mean_precision, mean_recall=row.mean_recall,
                      false_positive_units=row.false_positive_units, redundant_units=row.redundant_units,
                      overmerged_units=row.overmerged_units, collision_recall=row.collision_recall)
    # keep the evidence even without --keep
    for name in ("accm.log", "timings.json", "encoder.json", "motion/run_times.json"):
        if (sorter_output / name).exists():
            shutil.copy(sorter_output / name, out / f"{tag}_{name.replace('/', '_')}")
    motion_times = sorter_output / "motion" / "run_times.json"
    if motion_times.exists():  # the split of the preprocess stage's motion estimation
        result["motion_run_times_s"] = json.loads(motion_times.read_text())
    with open(out / f"memory_timeline_{tag}.csv", "w") as f:
        f.write("t_s,tree_rss_gib,main_rss_gib,nproc,tree_pss_gib,pss_anon_gib,pss_file_gib,pss_shmem_gib,"
                "shm_mapped_gib,footprint_gib\n")
        for s in samples:
            pss = [f"{s[k] / GIB:.4f}" if k in s else ""
                   for k in ("pss", "pss_anon", "pss_file", "pss_shmem", "shm", "footprint")]
            f.write(f"{s['t'] - t_start:.2f},{s['rss'] / GIB:.4f},{s['main_rss'] / GIB:.4f},{s['nproc']},"
                    + ",".join(pss) + "\n")
    print(f"{time.strftime('%H:%M:%S')} [{tag}] {status}: wall {wall:.0f} s, CPU {cpu:.0f} s, peak RSS "
          f"{result['peak_rss_gib']:.2f} GiB (PSS {result['peak_pss_gib']:.2f} GiB)", flush=True)
    return result


# --- reporting ------------------------------------------------------------------------------------

def fmt(x, spec=".2f"):
    if isinstance(x, (int, float)) and x == x:
        return format(x, spec)
    return "–"


def standalone_inference_rate(sorter_output: Path, threads: int) -> float:
    """accm_sorter.benchmark.encoder_throughput (200,000 random snippets) with ``threads`` torch threads."""
    import torch

    from accm_sorter.benchmark import encoder_throughput

    torch.set_num_threads(threads)
    return encoder_throughput(sorter_output, device="cpu")


def summarize(results, args, standalone_rate, state) -> tuple[str, dict]:
    lines = [f"# accm 384-channel scale benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"384 channels (4 staggered columns, NP1.0-like), {args.num_units} units ({FIRING_RATES[0]:g}-"
             f"{FIRING_RATES[1]:g} Hz), {NOISE_UV:g} uV noise, 30 kHz, seed {args.seed}, accm defaults + "
             f"job_kwargs n_jobs={args.n_jobs}; {os.cpu_count()} CPU cores.", "",
             f"accm code: git {state.get('git_head', '?')}, sources sha1 {state.get('accm_sources_sha1')}, uncommitted "
             f"changes in {', '.join(state.get('uncommitted', [])) or 'none'}; defaults {state.get('defaults')}.", "",
             "| duration | status | wall | CPU | mean load (1 min) | peak RSS (tree sum) | peak PSS (tree) | "
             "peak footprint (PSS + whole shm) | peak RSS main process | ru_maxrss child | preproc. cache | "
             "spikes detected | units | well-detected (acc >= 0.8) | mean accuracy | encoder inference (in run) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['duration_s']:g} s | {r['status']} | {fmt(r['wall_s'], '.0f')} s | {fmt(r['cpu_s'], '.0f')} s | "
            f"{fmt(r['mean_load_1min'], '.1f')} | "
            f"{fmt(r['peak_rss_gib'])} GiB | {fmt(r['peak_pss_gib'])} GiB | {fmt(r.get('peak_footprint_gib'))} GiB | "
            f"{fmt(r['peak_main_rss_gib'])} GiB | "
            f"{fmt(r['ru_maxrss_child_gib'])} GiB | {r['preprocessing_cache']} | {fmt(r['spikes_detected'], ',.0f')} | "
            f"{r.get('num_units', '–')} | {r.get('well_detected', '–')}/{r.get('num_gt_units', r['num_units_gt'])} | "
            f"{fmt(r.get('mean_accuracy', float('nan')), '.3f')} | {fmt(r['inference_spikes_per_s'], ',.0f')} /s |")
    verdict = {}
    ok = [r for r in results if r["status"] == "ok"]
    stopped = [r for r in results if r["status"].startswith("timeout")]
    lines.append("")
    if ok or stopped:
        worst = max(r["peak_rss_gib"] for r in ok + stopped)
        if worst >= RSS_TARGET_GIB:
            verdict["peak_rss_below_8gib"] = False
        elif len(ok) == len(results):
            verdict["peak_rss_below_8gib"] = True
        else:
            verdict["peak_rss_below_8gib"] = None  # a run was stopped or failed below the target
        word = {True: "PASS", False: "FAIL", None: "not decided (a run did not finish)"}[verdict["peak_rss_below_8gib"]]
        lines.append(f"- peak RSS (tree sum) {worst:.2f} GiB at most{' (including runs stopped early)' if stopped else ''}"
                     f", target < {RSS_TARGET_GIB:g} GiB: {word} (tree PSS at most "
                     f"{max(r['peak_pss_gib'] for r in ok + stopped):.2f} GiB)")
    measured = ok + stopped
    if len(measured) >= 2:
        short = min(measured, key=lambda r: r["duration_s"])
        long_ = max(measured, key=lambda r: r["duration_s"])
        if short in ok and long_ is not short:
            ratio = long_["peak_rss_gib"] / short["peak_rss_gib"]
            ratio_pss = long_["peak_pss_gib"] / short["peak_pss_gib"] if short["peak_pss_gib"] else float("nan")
            bound = long_ in stopped  # the long run was killed: its peak so far is a lower bound
            verdict["ratio"] = ratio
            verdict["ratio_is_lower_bound"] = bound
            verdict["ratio_below_1.5"] = None if (bound and ratio < RATIO_TARGET) else ratio < RATIO_TARGET
            word = ("not decided (lower bound, run stopped)" if verdict["ratio_below_1.5"] is None
                    else "PASS" if ratio < RATIO_TARGET else "FAIL")
            lines.append(f"- peak RSS {long_['duration_s']:g} s / {short['duration_s']:g} s = "
                         f"{long_['peak_rss_gib']:.2f} / {short['peak_rss_gib']:.2f} = {'>= ' if bound else ''}"
                         f"{ratio:.2f}, target < {RATIO_TARGET:g}: {word} (PSS ratio {'>= ' if bound else ''}"
                         f"{ratio_pss:.2f})")
    rates = [r["inference_spikes_per_s"] for r in ok if r["inference_spikes_per_s"] == r["inference_spikes_per_s"]]
    if rates or standalone_rate == standalone_rate:
        best_in_run = max(rates) if rates else float("nan")
        verdict["inference_in_run"] = best_in_run
        verdict["inference_standalone"] = standalone_rate
        passed = max(x for x in (best_in_run, standalone_rate, -1.0) if x == x) >= INFERENCE_TARGET
        verdict["inference_at_least_100k"] = passed
        lines.append(f"- encoder inference on CPU: {fmt(best_in_run, ',.0f')} spikes/s in the runs (embed stage, "
                     f"torch threads = n_jobs = {args.n_jobs}), {fmt(standalone_rate, ',.0f')} spikes/s standalone "
                     f"(accm_sorter.benchmark.encoder_throughput, 200,000 snippets, {args.n_jobs} threads); target >= "
                     f"{INFERENCE_TARGET:,}: {'PASS' if passed else 'FAIL'}")
    for r in results:
        lines += ["", f"## {r['duration_s']:g} s: stages (accm timings.json) and memory of the process tree", "",
                  "| stage | seconds | RSS at start | RSS at end | peak RSS | peak main-process RSS | processes | "
                  "peak PSS (anon / file / shmem) | shm mapped | peak footprint |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["stages"]:
            pss = (f"{fmt(s.get('pss_peak_gib'))} ({fmt(s.get('pss_anon_gib'))} / {fmt(s.get('pss_file_gib'))} / "
                   f"{fmt(s.get('pss_shmem_gib'))})") if "pss_peak_gib" in s else "–"
            lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {fmt(s.get('rss_start_gib'))} | "
                         f"{fmt(s.get('rss_end_gib'))} | {fmt(s.get('rss_peak_gib'))} | "
                         f"{fmt(s.get('main_rss_peak_gib'))} | {s.get('max_procs', '–')} | {pss} | "
                         f"{fmt(s.get('shm_peak_gib'))} | {fmt(s.get('footprint_peak_gib'))} |")
    return "\n".join(lines) + "\n", verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", default="120,600", help="comma-separated durations in seconds")
    parser.add_argument("--num-units", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2002)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "accm_scale_384ch"))
    parser.add_argument("--n-jobs", type=int, default=2, help="passed to accm as job_kwargs={'n_jobs': N}")
    parser.add_argument("--keep", action="store_true", help="keep the sorter run folders and generated data")
    parser.add_argument("--timeout", type=float, default=4200.0, help="seconds per sort before it is killed")
    parser.add_argument("--live-code", action="store_true",
                        help="import accm_sorter from the working tree in every run instead of a copy frozen at "
                             "the start (the copy keeps the durations comparable while the tree is edited)")
    args = parser.parse_args(argv)
    durations = [float(d) for d in args.durations.split(",") if d.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if not args.live_code:
        frozen = freeze_code(out)
        CODE_PATH[:] = [str(frozen)]
        sys.path.insert(0, str(frozen))  # this process scores with the same copy
        for name in [m for m in sys.modules if m == "accm_sorter" or m.startswith("accm_sorter.")]:
            del sys.modules[name]
    import accm_sorter

    state = code_state(Path(accm_sorter.__file__).resolve().parent)
    print(f"accm code: {state}", flush=True)
    results = []
    for duration in durations:
        results.append(run_duration(duration, args, out))
        (out / "summary.json").write_text(json.dumps(dict(results=results), indent=1, default=float))

    standalone = float("nan")
    done = [r for r in results if r["status"] == "ok"]
    if done:
        sorter_output = out / f"run_{done[-1]['duration_s']:g}s" / "sorter_output"
        standalone = standalone_inference_rate(sorter_output, args.n_jobs)
    text, verdict = summarize(results, args, standalone, state)
    (out / "summary.json").write_text(json.dumps(dict(results=results, verdict=verdict, args=vars(args),
                                                      code=state), indent=1, default=float))
    (out / "summary.md").write_text(text)
    print()
    print(text)
    for r in results:
        print(f"accm.log of the {r['duration_s']:g} s run, with the tree RSS when each line was written "
              "(and the peak since the line before):")
        for e in r["annotated_log"]:
            print(f"  {time.strftime('%H:%M:%S', time.localtime(e['t']))} rss {fmt(e['rss_gib'])} "
                  f"(peak {fmt(e['peak_since_previous_gib'])}) GiB  {e['message'][:150]}")
    if not args.keep:
        for duration in durations:
            for name in (f"run_{duration:g}s", f"data_{duration:g}s"):
                shutil.rmtree(out / name, ignore_errors=True)
    print(f"\nsummary, timelines and logs in {out}")
    return 0


if __name__ == "__main__":
    # run as a script: import this file as the module "scale_384ch", so that the recording class has an
    # importable name in the serialized recording (the sorting process imports it from benchmarks/)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale_384ch

    sys.exit(scale_384ch.main())
