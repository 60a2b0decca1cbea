"""accm next to tridesclous2 and spykingcircus2 on the probe32 scenario, plus encoder throughput.

    python benchmarks/probe32_vs_peers.py [output_folder] [--duration 120] [--seed 2002]

Scenario: 32 channels (2 columns x 16, 20 um pitch), 25 units firing 2-15 Hz, noise 5 uV,
upsample_factor=4, 30 kHz. Every sorter runs in its own process on the same cached int16 data;
wall time, CPU time and peak RSS of its process tree are measured here. Prints figures, asserts
nothing: the machines are shared, so compare the ratios from one run.
"""

import argparse
import os

import torch

from accm_sorter.benchmark import benchmark, encoder_throughput, markdown_table

parser = argparse.ArgumentParser()
parser.add_argument("output", nargs="?", default="benchmark_output/probe32")
parser.add_argument("--duration", type=float, default=120.0)
parser.add_argument("--seed", type=int, default=2002)
args = parser.parse_args()

rows = benchmark(["probe32"], ["accm", "tridesclous2", "spykingcircus2"], args.duration, args.seed, args.output)
print()
print(markdown_table(rows))
by_name = {r.sorter: r for r in rows}
accm, tdc2 = by_name["accm"], by_name["tridesclous2"]
if accm.status == "ok":
    torch.set_num_threads(os.cpu_count())
    rate = encoder_throughput(os.path.join(args.output, "runs", "probe32", "accm", "sorter_output"))
    print(f"accm well-detected {accm.well_detected}/{accm.num_gt_units} (target >= 20), "
          f"mean accuracy {accm.mean_accuracy:.3f}")
    if tdc2.status == "ok":
        print(f"wall time accm / tridesclous2 = {accm.wall_s:.1f} / {tdc2.wall_s:.1f} s = "
              f"{accm.wall_s / tdc2.wall_s:.2f} (target <= 2)")
    print(f"peak RSS accm {accm.peak_rss_mib / 1024:.2f} GiB (target < 3)")
    print(f"encoder inference on CPU ({os.cpu_count()} threads): {rate:,.0f} spikes/s "
          f"(target >= 50,000; the ACCM paper reports 1,250)")
    if torch.cuda.is_available():
        gpu = encoder_throughput(os.path.join(args.output, "runs", "probe32", "accm", "sorter_output"),
                                 num_spikes=1_000_000, batch_size=16384, device="cuda")
        print(f"encoder inference on GPU: {gpu:,.0f} spikes/s")
