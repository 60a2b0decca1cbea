"""Curated labels: validation and the guarantee that labelled units come out intact."""

import numpy as np
import pytest
import spikeinterface.sorters as ss
from spikeinterface.core import NumpySorting

from accm_sorter.labels import LabelsError, attach_labels, check_labels, load_label_sorting
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


def test_attach_labels_matches_and_adds_missing_spikes():
    from spikeinterface.core.node_pipeline import base_peak_dtype

    peaks = np.zeros(3, dtype=base_peak_dtype)
    peaks["sample_index"] = [100, 500, 900]
    peaks["channel_index"] = [2, 3, 2]
    from accm_sorter.labels import Labels

    labels = Labels(np.array(["u"]), np.zeros(3, "int64"), np.array([103, 700, 901]), np.zeros(3, "int64"))
    out, units = attach_labels(peaks, labels, 30000.0)
    assert out["sample_index"].tolist() == [103, 500, 700, 901]  # curated times win
    assert units.tolist() == [0, -1, 0, 0]
    assert out["channel_index"][2] == 2  # the unit's main channel
