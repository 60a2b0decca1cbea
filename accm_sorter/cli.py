"""``accm-sorter``: demo, sort and params from the command line."""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path


def parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got '{text}'")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as cpu or neg
    return name.strip(), value


def load_recording(path: str):
    """Open a recording SpikeInterface can read, choosing the reader from what the path looks like."""
    import spikeinterface.core as sc
    import spikeinterface.extractors as se

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"accm-sorter: {p} does not exist.")
    if p.is_file() and p.suffix.lower() == ".nwb":
        return se.read_nwb_recording(p)
    if p.is_file() and p.suffix.lower() in (".json", ".pkl", ".pickle"):
        return sc.load(p)
    if p.is_dir():
        names = {q.name for q in p.iterdir()}
        if "si_folder.json" in names or "binary.json" in names or p.suffix == ".zarr":
            return sc.load(p)
        if any(n.endswith(".ap.meta") or n.endswith(".lf.meta") for n in names) or any(
            q.is_dir() and any(r.name.endswith(".ap.meta") for r in q.iterdir()) for q in p.iterdir()
        ):
            streams, _ = se.get_neo_streams("spikeglx", p)
            ap = [s for s in streams if s.endswith(".ap")] or streams
            return se.read_spikeglx(p, stream_id=ap[0])
        if "settings.xml" in names or "structure.oebin" in names or any(
            q.is_dir() and (q / "settings.xml").exists() for q in p.iterdir()
        ):
            return se.read_openephys(p)
    raise SystemExit(
        f"accm-sorter: cannot tell the format of {p}. Give a saved SpikeInterface folder (recording.save(folder=...)), "
        "a SpikeInterface .json, an .nwb file, a SpikeGLX folder or an Open Ephys folder; for other formats load "
        "the recording in Python with spikeinterface.extractors and call run_sorter('accm', recording)."
    )


def score_table(gt_sorting, sorting):
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    comparison = compare_sorter_to_ground_truth(gt_sorting, sorting, exhaustive_gt=True)
    perf = comparison.get_performance()
    return comparison, perf


def cmd_demo(args) -> int:
    import spikeinterface.sorters as ss

    import accm_sorter  # noqa: F401
    from .scenarios import generate_scenario

    print(f"Generating the '{args.scenario}' ground-truth recording ({args.duration:g} s, seed {args.seed}) ...")
    folder = Path(args.folder)
    gt_folder = folder.with_name(folder.name + "_data")
    recording, gt_sorting = generate_scenario(args.scenario, duration=args.duration, seed=args.seed,
                                              folder=gt_folder)
    print(f"{recording.get_num_channels()} channels, {gt_sorting.get_num_units()} ground-truth units, "
          f"{recording.sampling_frequency:g} Hz")
    params = dict(args.param or [])
    params.setdefault("device", args.device)
    t0 = time.perf_counter()
    sorting = ss.run_sorter("accm", recording, folder=args.folder, remove_existing_folder=True,
                            verbose=args.verbose, **params)
    wall = time.perf_counter() - t0
    _, perf = score_table(gt_sorting, sorting)
    print()
    print(perf[["accuracy", "recall", "precision"]].round(3).to_string())
    well = int((perf["accuracy"] >= 0.8).sum())
    print()
    print(f"accm found {sorting.get_num_units()} units in {wall:.1f} s")
    print(f"well-detected units (accuracy >= 0.8): {well} / {gt_sorting.get_num_units()}")
    print(f"mean accuracy: {perf['accuracy'].mean():.3f}")
    print(f"output folder: {Path(args.folder).resolve()}")
    return 0


def cmd_sort(args) -> int:
    import spikeinterface.sorters as ss

    import accm_sorter  # noqa: F401

    recording = load_recording(args.recording)
    params = dict(args.param or [])
    if args.labels:
        params["labels"] = str(Path(args.labels).resolve())
    if args.encoder:
        params["pretrained_encoder"] = str(Path(args.encoder).resolve())
    sorting = ss.run_sorter("accm", recording, folder=args.folder, remove_existing_folder=args.overwrite,
                            verbose=args.verbose, **params)
    print(f"accm: {sorting.get_num_units()} units, {sorting.to_spike_vector().size} spikes; "
          f"sorting saved in {Path(args.folder).resolve() / 'sorter_output' / 'sorting'}")
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import main_benchmark

    return main_benchmark(args)


def cmd_params(args) -> int:
    from .params import PARAMETERS, parameters_markdown

    if args.markdown:
        print(parameters_markdown())
        return 0
    for p in PARAMETERS:
        print(f"{p.name:28s} {p.default!r:>12}  [{p.stage}] {p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accm-sorter", description="ACCM contrastive spike sorter")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sort a generated ground-truth recording and print its score")
    demo.add_argument("--scenario", default="probe32",
                      help="generated recording: tetrode, probe32, dense-overlap or low-snr (default probe32)")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of data (default 60)")
    demo.add_argument("--seed", type=int, default=2002)
    demo.add_argument("--folder", default="accm_demo_output")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE")
    demo.add_argument("--verbose", action="store_true")
    demo.set_defaults(func=cmd_demo)

    sort = sub.add_parser("sort", help="sort a recording SpikeInterface can read")
    sort.add_argument("recording", help="saved SpikeInterface folder/JSON, .nwb file, SpikeGLX or Open Ephys folder")
    sort.add_argument("--folder", default="accm_output")
    sort.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sort.add_argument("--labels", help="curated partial sorting of this recording (sorting folder or phy folder)")
    sort.add_argument("--encoder", help="start from a previous run's encoder (its folder or encoder.pt)")
    sort.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE")
    sort.add_argument("--verbose", action="store_true")
    sort.set_defaults(func=cmd_sort)

    bench = sub.add_parser("benchmark", help="run sorters on ground-truth scenarios and score them")
    bench.add_argument("--scenarios", default="probe32", help="comma-separated scenario names (default probe32)")
    bench.add_argument("--sorters", default="accm,tridesclous2,spykingcircus2", help="comma-separated sorter names")
    bench.add_argument("--duration", type=float, default=120.0)
    bench.add_argument("--seed", type=int, default=2002)
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per sorter run")
    bench.add_argument("--output", default="benchmark_output")
    bench.add_argument("--ablation", action="store_true",
                       help="also run accm with each part of the method switched off (accm:no-matching, ...; "
                            "docs/benchmarks.md lists them)")
    bench.set_defaults(func=cmd_benchmark)

    params = sub.add_parser("params", help="list the parameters")
    params.add_argument("--markdown", action="store_true", help="print docs/parameters.md")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"accm-sorter: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
