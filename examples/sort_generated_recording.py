"""Sort a generated ground-truth recording with accm and score it with SpikeInterface.

    python examples/sort_generated_recording.py [scenario] [duration_s]
"""

import sys

import spikeinterface.full as si

import accm_sorter  # noqa: F401  registers "accm"
from accm_sorter.scenarios import generate_scenario

scenario = sys.argv[1] if len(sys.argv) > 1 else "probe32"
duration = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0

# written once to disk (int16 binary + ground-truth sorting) so the sorter can reload it
recording, gt_sorting = generate_scenario(scenario, duration=duration, seed=2002, folder=f"example_{scenario}_data")
sorting = si.run_sorter("accm", recording, folder=f"example_{scenario}_accm", remove_existing_folder=True,
                        verbose=True)

comparison = si.compare_sorter_to_ground_truth(gt_sorting, sorting, exhaustive_gt=True)
performance = comparison.get_performance()
print(performance[["accuracy", "precision", "recall"]].round(3))
print("well-detected units:", int((performance["accuracy"] >= 0.8).sum()), "/", gt_sorting.get_num_units())

# accm's per-spike confidence from the pairwise classifier, aligned with the detected peaks
import numpy as np  # noqa: E402

out = f"example_{scenario}_accm/sorter_output"
confidence, labels = np.load(f"{out}/confidence.npy"), np.load(f"{out}/spike_labels.npy")
print(f"median confidence of kept spikes {np.median(confidence[labels >= 0]):.3f}, "
      f"of discarded ones {np.median(confidence[labels < 0]):.3f}")
