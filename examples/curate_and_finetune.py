"""Curate a few units (here: from ground truth), give them to accm and see what changes.

    python examples/curate_and_finetune.py [scenario] [duration_s]

20% of the units are "curated" with 10% of their spikes each, the way a lab would label part of
a session in phy. accm runs once self-supervised and once with those labels; accuracy is
reported separately for the curated units and for all the others.
"""

import sys

import numpy as np
import spikeinterface.full as si

import accm_sorter  # noqa: F401
from accm_sorter.scenarios import generate_scenario

scenario = sys.argv[1] if len(sys.argv) > 1 else "low-snr"
duration = float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
recording, gt = generate_scenario(scenario, duration=duration, seed=2002, folder=f"example_{scenario}_data")

rng = np.random.default_rng(0)
curated_units = list(rng.choice(gt.unit_ids, size=max(1, gt.get_num_units() // 5), replace=False))
trains = {u: np.sort(rng.choice(gt.get_unit_spike_train(u), size=max(1, gt.get_unit_spike_train(u).size // 10),
                                replace=False)) for u in curated_units}
si.NumpySorting.from_unit_dict([trains], gt.sampling_frequency).save(folder=f"example_{scenario}_curated",
                                                                        overwrite=True)

for name, extra in [("self-supervised", {}), ("with labels", {"labels": f"example_{scenario}_curated"})]:
    sorting = si.run_sorter("accm", recording, folder=f"example_{scenario}_{name.replace(' ', '_')}",
                            remove_existing_folder=True, **extra)
    perf = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
    print(f"{name:16s} curated units: mean accuracy {perf.accuracy[curated_units].mean():.3f}   "
          f"other units: {perf.accuracy.drop(curated_units).mean():.3f}   "
          f"well-detected {(perf.accuracy >= 0.8).sum()}/{gt.get_num_units()}")
