"""Channel groups (shanks, tetrodes) are sorted separately and aggregated into one sorting."""

import numpy as np
import pytest
import spikeinterface.core as sc
import spikeinterface.sorters as ss

from accm_sorter.scenarios import SMALL8
from tests.conftest import FAST

UNITS_PER_SHANK = 5


@pytest.fixture(scope="module")
def two_shanks(tmp_path_factory):
    """Two 8-channel shanks 250 um apart, each with its own 5 ground-truth units (8 s, int16 on disk)."""
    from probeinterface import ProbeGroup

    recordings, gts = [], []
    for shank in range(2):
        recording, gt = sc.generate_ground_truth_recording(
            durations=[8.0], sampling_frequency=30000.0, num_channels=8, num_units=UNITS_PER_SHANK,
            generate_probe_kwargs=SMALL8,
            generate_sorting_kwargs=dict(firing_rates=(5.0, 15.0), refractory_period_ms=4.0),
            noise_kwargs=dict(noise_levels=5.0, strategy="on_the_fly"),
            generate_unit_locations_kwargs=dict(margin_um=10.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=15.0),
            upsample_factor=4, seed=11 + shank,
        )
        recordings.append(recording)
        gts.append(gt)
    recording = sc.aggregate_channels(recordings, renamed_channel_ids=[f"s{k // 8}c{k % 8}" for k in range(16)])
    probes = ProbeGroup()
    for shank in range(2):
        probe = recordings[shank].get_probe().copy()
        probe.move([250.0 * shank, 0.0])
        probe.set_device_channel_indices(np.arange(8) + 8 * shank)
        probes.add_probe(probe)
    recording.set_probegroup(probes)  # sets the channel property "group" to the probe index
    folder = tmp_path_factory.mktemp("multi_shank")
    recording = recording.save(folder=folder / "recording", n_jobs=1, progress_bar=False)
    gt = sc.aggregate_units(gts)
    gt.set_property("group", np.repeat([0, 1], UNITS_PER_SHANK))
    return recording, gt


@pytest.fixture(scope="module")
def sorted_by_group(two_shanks, tmp_path_factory):
    recording, _ = two_shanks
    folder = tmp_path_factory.mktemp("multi_shank_runs") / "accm"
    return ss.run_sorter("accm", recording, folder=folder, **FAST), folder


def test_groups_are_sorted_separately_and_aggregated(two_shanks, sorted_by_group):
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    recording, gt = two_shanks
    sorting, folder = sorted_by_group
    out = folder / "sorter_output"
    for group in (0, 1):
        assert (out / f"group_{group}" / "sorting").is_dir()
        assert (out / f"group_{group}" / "accm.log").is_file()
    assert (out / "sorting").is_dir()
    assert len(set(sorting.unit_ids)) == sorting.get_num_units()
    assert {"group", "main_channel_id", "accm_mean_confidence", "accm_group_unit_id"} <= set(
        sorting.get_property_keys())

    # every unit's main channel is a channel of its own group
    channel_group = dict(zip(recording.channel_ids, recording.get_property("group")))
    for unit_group, main in zip(sorting.get_property("group"), sorting.get_property("main_channel_id")):
        assert channel_group[main] == unit_group

    # measured with FAST settings: 7 of 10 units above 0.8 accuracy (5 on shank 0, 2 on shank 1)
    accuracy = compare_sorter_to_ground_truth(gt, sorting).get_performance()["accuracy"].astype(float).to_numpy()
    well = accuracy >= 0.8
    assert well.sum() >= 5, accuracy
    for group in (0, 1):
        assert well[gt.get_property("group") == group].sum() >= 1, accuracy

    # the aggregated sorting is what SpikeInterface reads back, and the log covers both groups
    again = ss.read_sorter_folder(folder)
    assert list(again.unit_ids) == list(sorting.unit_ids)
    assert list(again.get_property("group")) == list(sorting.get_property("group"))
    trace = "\n".join(sorting.sorting_info["log"]["runtime_trace"])
    assert "[group_0]" in trace and "[group_1]" in trace and "stage train" in trace


def _spy_on_run_accm(monkeypatch):
    import accm_sorter.pipeline as pipeline

    calls = []
    real = pipeline.run_accm

    def spy(recording, params, folder, verbose=False):
        calls.append((list(recording.channel_ids), folder))
        return real(recording, params, folder, verbose=verbose)

    monkeypatch.setattr(pipeline, "run_accm", spy)
    return calls


def test_split_by_group_false_runs_the_pipeline_once(two_shanks, tmp_path, monkeypatch):
    recording, _ = two_shanks
    calls = _spy_on_run_accm(monkeypatch)
    with pytest.warns(UserWarning, match="empty sorting"):  # threshold high: stops after detection
        sorting = ss.run_sorter("accm", recording, folder=tmp_path / "x", split_by_group=False,
                                detect_threshold=80.0, **FAST)
    assert len(calls) == 1 and calls[0][0] == list(recording.channel_ids)
    assert not list((tmp_path / "x" / "sorter_output").glob("group_*"))
    assert sorting.get_num_units() == 0


def test_an_empty_group_does_not_break_the_aggregation(two_shanks, tmp_path, monkeypatch):
    import accm_sorter.pipeline as pipeline
    from spikeinterface.core import NumpySorting

    recording, _ = two_shanks
    calls = []

    def fake_run_accm(sub_recording, params, folder, verbose=False):
        calls.append(list(sub_recording.channel_ids))
        if len(calls) == 1:  # the first group finds two units, the second none
            sorting = NumpySorting.from_unit_dict([{0: np.array([100, 900]), 1: np.array([500])}],
                                                  sub_recording.sampling_frequency)
            pipeline.write_sorting(sorting, folder, sub_recording.channel_ids[[0, 3]], [0.9, 0.8])
        else:
            sorting = NumpySorting.from_unit_dict([{}], sub_recording.sampling_frequency)
            pipeline.write_sorting(sorting, folder, [], [])
        return sorting

    monkeypatch.setattr(pipeline, "run_accm", fake_run_accm)
    sorting = ss.run_sorter("accm", recording, folder=tmp_path / "x", **FAST)
    assert calls == [[f"s0c{k}" for k in range(8)], [f"s1c{k}" for k in range(8)]]
    assert list(sorting.unit_ids) == [0, 1]
    assert list(sorting.get_property("group")) == [0, 0]
    assert list(sorting.get_property("main_channel_id")) == ["s0c0", "s0c3"]
    assert sorting.get_unit_spike_train(0).tolist() == [100, 900]


def test_every_group_empty_gives_an_empty_sorting(two_shanks, tmp_path):
    recording, _ = two_shanks
    with pytest.warns(UserWarning, match="empty sorting"):
        sorting = ss.run_sorter("accm", recording, folder=tmp_path / "x", detect_threshold=80.0, **FAST)
    assert sorting.get_num_units() == 0
    assert sorted(p.name for p in (tmp_path / "x" / "sorter_output").glob("group_*")) == ["group_0", "group_1"]


def test_labels_with_several_groups_ask_what_to_do(two_shanks, tmp_path):
    recording, _ = two_shanks
    with pytest.raises(ValueError, match="split_by_group=False"):
        ss.run_sorter("accm", recording, folder=tmp_path / "x", labels=str(tmp_path / "labels"))
    assert not (tmp_path / "x").exists()
