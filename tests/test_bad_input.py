"""Bad input gets a clear error before heavy work, or a valid (possibly empty) sorting.

The bad-input matrix, at least one test per case (each error message is checked for what to change):

| # | input | result | test |
|---|---|---|---|
| 1 | no probe | error: attach a probe | test_no_probe |
| 2 | duplicated channel locations | error: run_sorter_by_property / fix geometry | test_duplicated_locations, test_duplicated_locations_through_run_sorter |
| 3 | 0 channels | error: no channels | test_zero_channels |
| 4 | 1 channel | sorted | test_one_channel_sorts |
| 5 | a few samples long | error: needs at least 3 s | test_a_few_samples_long, test_too_short |
| 6 | all zeros | error: check file/stream/dtype | test_all_zeros |
| 7 | NaN / inf | error: remove channels / repair | test_nan_in_traces |
| 8 | +30000 offset on int16 data | sorted as without it | test_huge_constant_offset_sorts_like_without |
| 9 | int16 with gains | sorted | test_int16_with_gains |
| 10 | int16 without gains | sorted like with gains | test_int16_without_gains_sorts_like_with_gains |
| 11 | multi-segment, mixed time info | sorted, segments kept | test_multi_segment_with_mixed_time_info |
| 12 | multi-segment, last segment without spikes | sorted, segments kept (with and without masked-spike recovery) | test_multi_segment_last_segment_without_spikes, test_multi_segment_last_segment_without_spikes_with_masked_spike_recovery |
| 13 | list / tuple of recordings, mixed rates | error: run_sorter_jobs / resample | test_list_of_recordings_with_mixed_rates |
| 14 | not a recording (array, path) | error: load / wrap it | test_not_a_recording, test_path_instead_of_recording |
| 15 | unknown parameter | error: did you mean ... | test_unknown_parameter_suggests_the_right_name |
| 16 | wrong parameter type / range | error: the type / range | test_wrong_type_and_out_of_range |
| 17 | output folder not writable | error: choose another folder | test_output_folder_read_only, test_output_folder_under_a_file |
| 18 | output folder exists | error: remove_existing_folder=True | test_existing_output_folder |
| 19 | non-serializable in-memory recording | error: recording.save(folder=...) | test_in_memory_recording_asks_to_be_saved |
| 20 | device='cuda' without CUDA | error: use cpu/auto | test_cuda_without_cuda |
| 21 | no spike above threshold | empty sorting + warning | test_no_spike_crosses_threshold_gives_empty_sorting |
| 22 | failure in the middle of a run | no complete-looking output | test_failed_run_leaves_no_complete_looking_output |
"""

import os
from pathlib import Path

import numpy as np
import pytest
import spikeinterface.core as sc
import spikeinterface.sorters as ss

from accm_sorter.validation import OutputFolderError, RecordingCheckError
from tests.conftest import FAST, numpy_recording


def noise(seconds=6.0, channels=4, seed=0):
    return np.random.default_rng(seed).normal(0, 5, size=(int(seconds * 30000), channels))


def well_detected(gt, sorting, threshold=0.8):
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    accuracy = compare_sorter_to_ground_truth(gt, sorting).get_performance()["accuracy"].astype(float)
    return int((accuracy >= threshold).sum())


@pytest.fixture(scope="module")
def int16_with_gains(short_gt, tmp_path_factory):
    """short_gt as it is saved (int16, gain 0.25 uV/bit) sorted once with FAST settings."""
    recording, _ = short_gt
    assert recording.get_dtype() == np.int16 and recording.has_scaleable_traces()
    folder = tmp_path_factory.mktemp("bad_input") / "int16_gains"
    return ss.run_sorter("accm", recording, folder=folder, **FAST)


def test_no_probe(tmp_path):
    rec = numpy_recording(noise(), with_probe=False)
    with pytest.raises(ValueError, match="no channel locations"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_duplicated_locations():
    # SpikeInterface 0.105 refuses duplicated contacts when a probe is set, but recordings from
    # older versions or custom extractors can still report them: the check must catch it.
    from accm_sorter.validation import check_recording

    rec = numpy_recording(noise())
    rec.get_channel_locations = lambda *args, **kwargs: np.zeros((4, 2))
    with pytest.raises(RecordingCheckError, match="run_sorter_by_property"):
        check_recording(rec)


def test_duplicated_locations_through_run_sorter(tmp_path):
    rec = sc.generate_recording(num_channels=4, durations=[6.0], seed=0)  # lazy and serializable
    rec.get_probegroup().probes[0].contact_positions[:] = 0.0  # what a custom extractor could report
    with pytest.raises(RecordingCheckError, match="share the same location.*fix the probe geometry"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_zero_channels(tmp_path):
    rec = sc.NumpyRecording([np.zeros((180000, 0), dtype="float32")], 30000.0)
    with pytest.raises(RecordingCheckError, match="no channels.*Check the stream you loaded"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_one_channel_sorts(tmp_path):
    # single electrodes are supported: snippets, whitening and clustering work on one channel
    rec, gt = sc.generate_ground_truth_recording(
        durations=[6.0], sampling_frequency=30000.0, num_channels=1, num_units=2, seed=1,
        generate_probe_kwargs=dict(num_columns=1, num_contact_per_column=1, xpitch=20, ypitch=20,
                                   contact_shapes="circle", contact_shape_params={"radius": 6}),
        generate_sorting_kwargs=dict(firing_rates=10.0, refractory_period_ms=4.0),
    )
    rec = rec.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    sorting = ss.run_sorter("accm", rec, folder=tmp_path / "x", **FAST)
    assert sorting.get_num_units() >= 1
    assert set(sorting.get_property("main_channel_id")) == set(rec.channel_ids)
    assert well_detected(gt, sorting) >= 1


def test_a_few_samples_long(tmp_path):
    rec = numpy_recording(noise(seconds=0.0002), folder=tmp_path / "rec")  # 6 samples
    assert rec.get_num_samples() == 6
    with pytest.raises(RecordingCheckError, match="lasts 0.000 s.*needs at least 3 s"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_all_zeros(tmp_path):
    rec = numpy_recording(np.zeros((180000, 4)), folder=tmp_path / "rec")
    with pytest.raises(RecordingCheckError, match="zero on every channel.*right file, stream and dtype"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_parameter_suggests_the_right_name(short_gt, tmp_path):
    rec, _ = short_gt
    with pytest.raises(ValueError, match="did you mean 'detect_threshold'"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", detect_treshold=5)
    # the rejected call leaves nothing behind: the corrected call can use the same folder
    assert not (tmp_path / "x").exists()


def test_wrong_type_and_out_of_range(short_gt, tmp_path):
    rec, _ = short_gt
    with pytest.raises(TypeError, match="train_steps"):
        ss.run_sorter("accm", rec, folder=tmp_path / "a", train_steps="many")
    with pytest.raises(ValueError, match="out of range"):
        ss.run_sorter("accm", rec, folder=tmp_path / "b", detect_threshold=-1.0)
    with pytest.raises(ValueError, match="freq_min"):
        ss.run_sorter("accm", rec, folder=tmp_path / "c", freq_min=7000.0, freq_max=6000.0)
    with pytest.raises(ValueError, match="not allowed"):
        ss.run_sorter("accm", rec, folder=tmp_path / "d", device="tpu")


def test_cuda_without_cuda(short_gt, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rec, _ = short_gt
    with pytest.raises(ValueError, match="no CUDA"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", device="cuda")


def test_too_short(tmp_path):
    rec = numpy_recording(noise(seconds=0.5))
    with pytest.raises(ValueError, match="needs at least"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")


def test_nan_in_traces(tmp_path):
    traces = noise()
    traces[1000:1200, 2] = np.nan
    traces[-10:, 1] = np.inf
    rec = numpy_recording(traces)
    with pytest.raises(ValueError, match="NaN or inf"):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")


def test_huge_constant_offset_sorts_like_without(short_gt, int16_with_gains, tmp_path):
    # int16 data sitting at +30000 (an ADC offset): the band-pass removes it, nothing overflows
    import spikeinterface.preprocessing as spre

    recording, gt = short_gt
    shifted = spre.scale(recording, gain=1.0, offset=30000.0, dtype="int16")
    shifted = shifted.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    assert shifted.get_traces(end_frame=1000).min() > 29000
    sorting = ss.run_sorter("accm", shifted, folder=tmp_path / "x", **FAST)
    reference = well_detected(gt, int16_with_gains)
    assert reference >= 3
    assert well_detected(gt, sorting) >= reference - 1
    assert abs(sorting.to_spike_vector().size - int16_with_gains.to_spike_vector().size) < (
        0.1 * int16_with_gains.to_spike_vector().size)


def test_int16_with_gains(short_gt, int16_with_gains):
    _, gt = short_gt
    assert int16_with_gains.get_num_units() > 0
    assert well_detected(gt, int16_with_gains) >= 3


def test_int16_without_gains_sorts_like_with_gains(short_gt, int16_with_gains, tmp_path):
    # accm works in noise units, so the gain_to_uV property is not needed and does not change the result
    recording, gt = short_gt
    raw = sc.NumpyRecording([recording.get_traces()], recording.sampling_frequency)
    raw.set_probe(recording.get_probe())
    raw = raw.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    assert raw.get_dtype() == np.int16 and "gain_to_uV" not in raw.get_property_keys()
    sorting = ss.run_sorter("accm", raw, folder=tmp_path / "x", **FAST)
    assert well_detected(gt, sorting) >= well_detected(gt, int16_with_gains) - 1
    n, reference = sorting.to_spike_vector().size, int16_with_gains.to_spike_vector().size
    assert abs(n - reference) < 0.05 * reference


def test_multi_segment_with_mixed_time_info(short_gt, tmp_path):
    # one segment without a start time, one with (frame_slice sets it): SpikeInterface's in-memory cache
    # used to fail on float(None) deep inside the run
    from spikeinterface.core import append_recordings

    recording, _ = short_gt
    fs = recording.sampling_frequency
    multi = append_recordings([recording, recording.frame_slice(int(5 * fs), None)])
    assert multi.get_segment_t_starts() == [None, 5.0]  # only the slice has a start time
    sorting = ss.run_sorter("accm", multi, folder=tmp_path / "x", masked_spike_threshold=1.0, **FAST)
    assert sorting.get_num_segments() == 2
    assert sorting.get_num_units() > 0
    for seg in range(2):
        vector = sorting.to_spike_vector()
        in_seg = vector[vector["segment_index"] == seg]
        assert in_seg.size > 0 and in_seg["sample_index"].max() < multi.get_num_samples(seg)


def test_multi_segment_last_segment_without_spikes(short_gt, tmp_path):
    # a spike-free last segment used to vanish from the sorting (NumpySorting counts segments up to the last
    # spike), and run_sorter then failed to register the 2-segment recording to the 1-segment sorting
    from spikeinterface.core import append_recordings

    recording, _ = short_gt
    multi = append_recordings([recording, recording.frame_slice(0, 200)])
    sorting = ss.run_sorter("accm", multi, folder=tmp_path / "x", masked_spike_threshold=1.0, **FAST)
    assert sorting.get_num_segments() == 2
    assert sorting.get_num_units() > 0
    assert ss.read_sorter_folder(tmp_path / "x").get_num_segments() == 2


def test_multi_segment_last_segment_without_spikes_with_masked_spike_recovery(short_gt, tmp_path):
    from spikeinterface.core import append_recordings

    recording, _ = short_gt
    multi = append_recordings([recording, recording.frame_slice(0, 200)])
    sorting = ss.run_sorter("accm", multi, folder=tmp_path / "x", **FAST)  # masked_spike_threshold < 1
    assert sorting.get_num_segments() == 2


def test_list_of_recordings_with_mixed_rates(tmp_path):
    from spikeinterface.core import append_recordings, concatenate_recordings

    fast = sc.generate_recording(num_channels=4, sampling_frequency=30000.0, durations=[4.0], seed=0)
    slow = sc.generate_recording(num_channels=4, sampling_frequency=20000.0, durations=[4.0], seed=1)
    # SpikeInterface refuses a list before accm sees it and names the right function
    with pytest.raises(Exception, match=r"run_sorter_jobs"):
        ss.run_sorter("accm", [fast, slow], folder=tmp_path / "a")
    # other sequences reach accm, which says how to sort them one by one or together
    with pytest.raises(TypeError, match=r"run_sorter_jobs.*resample"):
        ss.run_sorter("accm", (fast, slow), folder=tmp_path / "b")
    # joining recordings of different rates is refused by SpikeInterface with the rates' difference
    for join in (concatenate_recordings, append_recordings):
        with pytest.raises(ValueError, match="Sampling frequencies across datasets differ"):
            join([fast, slow])
    assert not any(tmp_path.iterdir())


def test_path_instead_of_recording(tmp_path):
    with pytest.raises(TypeError, match=r"got a path.*spikeinterface.load\(path\)"):
        ss.run_sorter("accm", str(tmp_path / "my_recording"), folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_output_folder_read_only(short_gt, tmp_path, monkeypatch):
    rec, _ = short_gt
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:
        # root ignores the permission bits: let the check see the folder as others would
        import accm_sorter.validation as validation

        real_access = os.access
        monkeypatch.setattr(validation.os, "access",
                            lambda path, mode: False if Path(path) == parent else real_access(path, mode))
    try:
        with pytest.raises(OutputFolderError, match="no write permission.*Choose a folder="):
            ss.run_sorter("accm", rec, folder=parent / "x")
    finally:
        parent.chmod(0o755)


def test_output_folder_under_a_file(short_gt, tmp_path):
    # what a read-only location does for root too: the folder cannot be created
    rec, _ = short_gt
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder's parent should be")
    with pytest.raises(OutputFolderError, match="is a file, not a folder. Choose a folder="):
        ss.run_sorter("accm", rec, folder=blocker / "x")
    with pytest.raises(OutputFolderError, match="is an existing file.*Choose another folder="):
        ss.run_sorter("accm", rec, folder=blocker, remove_existing_folder=True)
    assert blocker.read_text().startswith("a file")


def test_existing_output_folder(short_gt, tmp_path):
    rec, _ = short_gt
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "keep.txt").write_text("earlier results")
    with pytest.raises(ValueError, match="already exists. Pass remove_existing_folder=True"):
        ss.run_sorter("accm", rec, folder=folder)
    assert (folder / "keep.txt").read_text() == "earlier results"  # nothing was touched


def test_no_spike_crosses_threshold_gives_empty_sorting(tmp_path):
    rec = numpy_recording(noise(seconds=6.0), folder=tmp_path / "rec")
    with pytest.warns(UserWarning, match="empty sorting"):
        sorting = ss.run_sorter("accm", rec, folder=tmp_path / "x", detect_threshold=50.0, **FAST)
    assert sorting.get_num_units() == 0
    assert (tmp_path / "x" / "sorter_output" / "sorting").is_dir()


def test_in_memory_recording_asks_to_be_saved(tmp_path):
    rec = numpy_recording(noise())
    with pytest.raises(ValueError, match=r"recording.save\(folder="):
        ss.run_sorter("accm", rec, folder=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_not_a_recording(tmp_path):
    with pytest.raises((TypeError, ValueError), match=r"got ndarray.*NumpyRecording\(traces_list="):
        ss.run_sorter("accm", np.zeros((100, 4)), folder=tmp_path / "x")


def test_failed_run_leaves_no_complete_looking_output(short_gt, tmp_path, monkeypatch):
    import accm_sorter.pipeline as pipeline
    from spikeinterface.sorters.utils import SpikeSortingError

    rec, _ = short_gt

    def explode(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the run")

    monkeypatch.setattr(pipeline, "embed", explode, raising=False)
    import accm_sorter.train as train

    monkeypatch.setattr(train, "embed", explode)
    with pytest.raises(SpikeSortingError):
        ss.run_sorter("accm", rec, folder=tmp_path / "x", **FAST)
    assert not (tmp_path / "x" / "sorter_output" / "sorting").exists()
    with pytest.raises(SpikeSortingError):
        ss.read_sorter_folder(tmp_path / "x")
