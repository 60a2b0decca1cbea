import warnings

import numpy as np
import pytest

import accm_sorter  # noqa: F401  (registers "accm")
from accm_sorter.scenarios import generate_scenario

warnings.filterwarnings("ignore", message="The extractor is not serializable")

# Training is the slow stage; these settings keep each sort to a few seconds while still learning.
FAST = dict(train_steps=120, batch_size=128, train_max_spikes=4000, job_kwargs=dict(n_jobs=1))


@pytest.fixture(scope="session")
def small_gt(tmp_path_factory):
    """8 channels, 8 units, 30 s, seed 3: a serializable lazy recording and its ground truth."""
    folder = tmp_path_factory.mktemp("gt") / "small8_gt"
    return generate_scenario("small8", duration=30.0, seed=3, folder=folder)


@pytest.fixture(scope="session")
def short_gt(tmp_path_factory):
    """8 channels, 8 units, 8 s: for tests that check behaviour rather than accuracy."""
    folder = tmp_path_factory.mktemp("gt") / "short_gt"
    return generate_scenario("small8", duration=8.0, seed=5, folder=folder)


@pytest.fixture(scope="session")
def sorted_small(small_gt, tmp_path_factory):
    """One full accm run (default parameters) on the small recording, shared by several tests."""
    import spikeinterface.sorters as ss

    recording, gt = small_gt
    folder = tmp_path_factory.mktemp("runs") / "accm_small"
    sorting = ss.run_sorter("accm", recording, folder=folder, verbose=False, job_kwargs=dict(n_jobs=1))
    return sorting, folder


def numpy_recording(traces, sampling_frequency=30000.0, with_probe=True, folder=None):
    """A recording from an array, on a linear probe; saved to ``folder`` when given (serializable)."""
    from probeinterface import generate_linear_probe
    from spikeinterface.core import NumpyRecording

    recording = NumpyRecording([np.asarray(traces, dtype="float32")], sampling_frequency)
    if with_probe:
        probe = generate_linear_probe(num_elec=recording.get_num_channels(), ypitch=20)
        probe.set_device_channel_indices(np.arange(recording.get_num_channels()))
        recording.set_probe(probe)
    if folder is not None:
        recording = recording.save(folder=folder, n_jobs=1, progress_bar=False)
    return recording
