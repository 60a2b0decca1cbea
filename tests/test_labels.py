"""Curated labels: validation and the guarantee that labelled units come out intact."""

import numpy as np
import pytest
import spikeinterface.sorters as ss
from spikeinterface.core import NumpySorting

from accm_sorter.labels import LabelsError, check_labels, load_label_sorting
from tests.conftest import FAST


def curated(gt, tmp_path, fraction=0.2, units=1, name="curated"):
    rng = np.random.default_rng(0)
    chosen = list(gt.unit_ids[:units])
    trains = {u: np.sort(rng.choice(gt.get_unit_spike_train(u), int(fraction * gt.get_unit_spike_train(u).size),
                                    replace=False)) for u in chosen}
    return NumpySorting.from_unit_dict([trains], gt.sampling_frequency).save(folder=tmp_path / name), chosen, trains


def test_labelled_units_come_out_intact(short_gt, tmp_path):
    recording, gt = short_gt
    folder, chosen, trains = curated(gt, tmp_path, units=2)
    sorting = ss.run_sorter("accm", recording, folder=tmp_path / "run", labels=str(tmp_path / "curated"), **FAST)
    curated_ids = sorting.get_property("accm_curated_unit_id")
    assert sorted(x for x in curated_ids if x) == sorted(str(u) for u in chosen)
    for unit_id, label in zip(sorting.unit_ids, curated_ids):
        if not label:
            continue
        found = sorting.get_unit_spike_train(unit_id)
        wanted = trains[type(chosen[0])(label)]
        # every labelled spike is in its unit (to the sample)
        assert np.isin(wanted, found).all()
    log = (tmp_path / "run" / "sorter_output" / "accm.log").read_text()
    assert "labels: 2 curated units" in log


def test_a_curated_unit_accm_never_found_comes_out_with_its_spikes(short_gt, tmp_path):
    """Labels on times where no neuron fires: no unit claims them, the unit is built from the labels alone."""
    recording, gt = short_gt
    rng = np.random.default_rng(1)
    times = np.sort(rng.choice(np.arange(1000, recording.get_num_samples() - 1000), 40, replace=False))
    NumpySorting.from_unit_dict([{"ghost": times}], recording.sampling_frequency).save(folder=tmp_path / "ghost")
    sorting = ss.run_sorter("accm", recording, folder=tmp_path / "run", labels=str(tmp_path / "ghost"), **FAST)
    curated_ids = list(sorting.get_property("accm_curated_unit_id"))
    assert curated_ids.count("ghost") == 1
    ghost = sorting.unit_ids[curated_ids.index("ghost")]
    assert np.isin(times, sorting.get_unit_spike_train(ghost)).all()
    log = (tmp_path / "run" / "sorter_output" / "accm.log").read_text()
    assert "1 curated units known only from their labels" in log
    # noise has no template to find: the false-discovery control adds nothing
    assert "curated units: 0 spikes matching missed found on the residual" in log


def test_labels_beyond_the_recording_are_refused(short_gt, tmp_path):
    recording, gt = short_gt
    late = NumpySorting.from_unit_dict([{"a": np.array([10, recording.get_num_samples() + 5])}],
                                       recording.sampling_frequency).save(folder=tmp_path / "late")
    with pytest.raises(LabelsError, match="beyond the recording"):
        check_labels(late, recording)
    with pytest.raises(ValueError, match="beyond the recording"):
        ss.run_sorter("accm", recording, folder=tmp_path / "x", labels=str(tmp_path / "late"), **FAST)


def test_labels_naming_unknown_channels_are_refused(short_gt, tmp_path):
    recording, gt = short_gt
    labels = NumpySorting.from_unit_dict([{"a": np.array([100, 200])}], recording.sampling_frequency)
    labels.set_property("main_channel_id", np.array(["not-a-channel"]))
    with pytest.raises(LabelsError, match="not-a-channel"):
        check_labels(labels, recording)


def test_labels_other_errors(short_gt, tmp_path):
    recording, _ = short_gt
    with pytest.raises(LabelsError, match="does not exist"):
        load_label_sorting(tmp_path / "nowhere")
    wrong_rate = NumpySorting.from_unit_dict([{"a": np.array([100])}], 20000.0)
    with pytest.raises(LabelsError, match="Hz"):
        check_labels(wrong_rate, recording)
    empty = NumpySorting.from_unit_dict([{"a": np.array([], dtype="int64")}], recording.sampling_frequency)
    with pytest.raises(LabelsError, match="no spike"):
        check_labels(empty, recording)


def test_label_peaks_matches_without_moving_peaks():
    from spikeinterface.core.node_pipeline import base_peak_dtype

    from accm_sorter.labels import Labels, label_peaks, peaks_for_missed_labels

    peaks = np.zeros(3, dtype=base_peak_dtype)
    peaks["sample_index"] = [100, 500, 900]
    peaks["channel_index"] = [2, 3, 2]
    labels = Labels(np.array(["u"]), np.zeros(3, "int64"), np.array([103, 700, 901]), np.zeros(3, "int64"))
    units, missed = label_peaks(peaks, labels, 30000.0)
    assert units.tolist() == [0, -1, 0]
    assert missed.tolist() == [1]  # 700 is 200 samples from any peak
    assert peaks["sample_index"].tolist() == [100, 500, 900]  # the self-supervised stages see the same peaks
    extra = peaks_for_missed_labels(peaks, units, labels, missed)
    assert extra["sample_index"].tolist() == [700] and extra["channel_index"].tolist() == [2]  # the unit's channel
    # missed spikes of several units come back in time order (the snippet pipeline reads chunks in order)
    two = Labels(np.array(["u", "v"]), np.zeros(3, "int64"), np.array([800, 300, 900]), np.array([0, 1, 0]))
    units, missed = label_peaks(peaks, two, 30000.0)
    assert peaks_for_missed_labels(peaks, units, two, missed)["sample_index"].tolist() == [300, 800]


def test_claim_units_renumbers_curated_first_and_merges_their_parts():
    from accm_sorter.curated import claim_units

    # units 0 and 2 hold curated unit 0's labelled spikes (an over-split neuron), unit 1 one stray one
    # the last six are labelled spikes detection missed (no unit): they do not dilute the shares
    labels = np.array([0, 0, 0, 2, 2, 1, 1, 1, 1, -1] + [-1] * 6)
    peak_units = np.array([0, 0, -1, 0, 0, -1, -1, -1, 0, 0] + [0] * 6)
    out, new_id, num_units, claimed_by = claim_units(labels, peak_units, num_curated=1)
    assert new_id.tolist() == [0, 1, 0]
    assert claimed_by.tolist() == [0, -1, 0]
    assert num_units == 2
    assert out.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0] + [0] * 6  # labelled spikes go to their curated unit
