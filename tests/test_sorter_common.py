"""SpikeInterface's common sorter checks (its common_tests module is not in the wheel), for accm."""

import json

import numpy as np
import spikeinterface.sorters as ss
from spikeinterface.core import concatenate_recordings

from accm_sorter import __version__
from tests.conftest import FAST


def test_run_sorter_output_layout_and_sorting_info(sorted_small, small_gt):
    sorting, folder = sorted_small
    recording, _ = small_gt
    assert sorting.get_num_units() > 0
    assert sorting.sampling_frequency == recording.sampling_frequency
    assert sorting.get_num_segments() == recording.get_num_segments()
    info = sorting.sorting_info
    assert set(info) >= {"recording", "params", "log"}
    assert info["params"]["sorter_name"] == "accm"
    assert info["log"]["sorter_version"] == __version__
    assert info["log"]["error"] is False
    out = folder / "sorter_output"
    for name in ("sorting", "accm.log", "encoder.pt", "encoder.json", "peaks.npy", "spike_labels.npy",
                 "confidence.npy", "embeddings.npy", "merges.json", "timings.json", "spikes.npy"):
        assert (out / name).exists(), name
    log = json.loads((folder / "spikeinterface_log.json").read_text())
    assert any("stage train" in line for line in log["runtime_trace"])
    # each unit has a main channel that is a real channel id
    main = sorting.get_property("main_channel_id")
    assert set(main) <= set(recording.channel_ids)


def test_saved_arrays_are_consistent(sorted_small):
    sorting, folder = sorted_small
    out = folder / "sorter_output"
    peaks = np.load(out / "peaks.npy")
    labels = np.load(out / "spike_labels.npy")
    confidence = np.load(out / "confidence.npy")
    embeddings = np.load(out / "embeddings.npy")
    assert labels.shape == confidence.shape == (peaks.size,)
    assert embeddings.shape[0] == peaks.size
    assert ((confidence >= 0) & (confidence <= 1)).all()
    # the sorting holds the template-matched spikes; the classified peaks are what the templates came from
    spikes = np.load(out / "spikes.npy")
    vector = sorting.to_spike_vector()
    assert spikes.size == vector.size
    assert np.array_equal(np.sort(spikes["sample_index"]), np.sort(vector["sample_index"]))
    assert set(np.unique(spikes["unit_index"])) == set(range(sorting.get_num_units()))
    # spikes kept by the classifier are, on the whole, the confident ones
    assert confidence[labels >= 0].mean() > confidence[labels < 0].mean()


def test_delete_output_folder_returns_in_memory_sorting(short_gt, tmp_path):
    recording, _ = short_gt
    sorting = ss.run_sorter("accm", recording, folder=tmp_path / "out", delete_output_folder=True, **FAST)
    assert not (tmp_path / "out" / "sorter_output").exists()
    assert sorting.get_num_units() > 0
    assert set(sorting.sorting_info) >= {"recording", "params", "log"}


def test_multi_segment(short_gt, tmp_path):
    recording, _ = short_gt
    two = recording.frame_slice(0, int(4 * recording.sampling_frequency))
    rest = recording.frame_slice(int(4 * recording.sampling_frequency), recording.get_num_samples())
    from spikeinterface.core import append_recordings

    multi = append_recordings([two, rest])
    sorting = ss.run_sorter("accm", multi, folder=tmp_path / "multi", **FAST)
    assert sorting.get_num_segments() == 2
    for seg in range(2):
        for unit in sorting.unit_ids:
            train = sorting.get_unit_spike_train(unit, segment_index=seg)
            assert train.size == 0 or train.max() < multi.get_num_samples(seg)
    # the same data as one segment gives a comparable number of spikes
    single = ss.run_sorter("accm", concatenate_recordings([two, rest]), folder=tmp_path / "single", **FAST)
    n_multi, n_single = sorting.to_spike_vector().size, single.to_spike_vector().size
    assert abs(n_multi - n_single) < 0.25 * n_single


def test_rerun_in_same_folder(short_gt, tmp_path):
    recording, _ = short_gt
    first = ss.run_sorter("accm", recording, folder=tmp_path / "again", **FAST)
    second = ss.run_sorter("accm", recording, folder=tmp_path / "again", remove_existing_folder=True, **FAST)
    assert first.get_num_units() == second.get_num_units()
