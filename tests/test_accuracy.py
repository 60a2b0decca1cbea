"""Real accuracy against ground truth on a small generated recording."""

import numpy as np
import spikeinterface.sorters as ss
from spikeinterface.comparison import compare_sorter_to_ground_truth

from tests.conftest import FAST


def test_well_detected_units_on_small_recording(sorted_small, small_gt):
    sorting, folder = sorted_small
    _, gt = small_gt
    perf = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
    well = int((perf["accuracy"] >= 0.8).sum())
    # Measured 7/8 (mean accuracy 0.82) on this seed; a pipeline that clusters badly, or loses the
    # spatial information, gets 0-3.
    assert well >= 5, perf
    assert perf["accuracy"].mean() >= 0.65, perf
    assert sorting.get_num_units() <= 2 * gt.get_num_units()
    # the default run looked for units on the residual of matching
    assert "discovery:" in (folder / "sorter_output" / "accm.log").read_text()


def test_same_seed_gives_identical_spike_trains_on_cpu(short_gt, tmp_path):
    recording, _ = short_gt
    params = dict(FAST, device="cpu", seed=11)
    a = ss.run_sorter("accm", recording, folder=tmp_path / "a", **params)
    b = ss.run_sorter("accm", recording, folder=tmp_path / "b", **params)
    va, vb = a.to_spike_vector(), b.to_spike_vector()
    assert va.size > 0
    assert np.array_equal(va, vb)


def test_without_discovery_the_first_matching_pass_stands(small_gt, tmp_path):
    """discover_units=False, matching_threshold=5 (accm 0.1): one matching pass, the same accuracy bar."""
    recording, gt = small_gt
    folder = tmp_path / "no_discovery"
    sorting = ss.run_sorter("accm", recording, folder=folder, discover_units=False, matching_threshold=5.0,
                            **dict(FAST, device="cpu"))
    perf = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
    log = (folder / "sorter_output" / "accm.log").read_text()
    assert "discovery:" not in log and "stage discover " not in log
    assert int((perf["accuracy"] >= 0.8).sum()) >= 5, perf
    assert perf["accuracy"].mean() >= 0.65, perf
    assert sorting.get_num_units() <= 2 * gt.get_num_units()
