"""A run killed half way (SIGKILL: no clean-up code runs) leaves no output that looks complete."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import spikeinterface.sorters as ss
from spikeinterface.sorters.utils import SpikeSortingError

from accm_sorter import ACCMSorter
from tests.conftest import FAST

RUN = textwrap.dedent(
    """
    import sys
    import spikeinterface.core as sc
    import spikeinterface.sorters as ss
    recording = sc.load(sys.argv[1])
    # far more training steps than the test waits for: the process is killed long before the end
    ss.run_sorter("accm", recording, folder=sys.argv[2], train_steps=100000, batch_size=128,
                  train_max_spikes=4000, job_kwargs=dict(n_jobs=1))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_leaves_no_complete_looking_output_and_reruns(short_gt, tmp_path):
    recording, _ = short_gt
    folder = tmp_path / "run"
    env = dict(os.environ)
    env.pop("ACCM_SORTER_NO_AUTOREGISTER", None)  # the child finds "accm" through the start-up hook
    recording.dump_to_json(tmp_path / "recording.json")
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "recording.json"), str(folder)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = folder / "sorter_output" / "accm.log"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and "stage detect ..." in log.read_text(encoding="utf8", errors="replace"):
                break  # well into the run: the folder, the parameters and the first stage's outputs exist
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert log.is_file(), "the run did not start within 120 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    out = folder / "sorter_output"
    assert out.is_dir() and "stage detect" in log.read_text()
    assert not (out / "sorting").exists()
    # SpikeInterface's own reader refuses the folder ...
    with pytest.raises(SpikeSortingError, match="failed"):
        ss.read_sorter_folder(folder)
    # ... and the folder says why and what to do
    info = json.loads((folder / "spikeinterface_log.json").read_text())
    assert info["error"] is True
    assert "did not finish" in info["error_trace"][0] and "remove_existing_folder=True" in info["error_trace"][0]
    with pytest.raises(SpikeSortingError, match="did not finish"):
        ACCMSorter.get_result_from_folder(folder)
    # a plain re-run refuses to overwrite it, saying how
    with pytest.raises(ValueError, match="remove_existing_folder=True"):
        ss.run_sorter("accm", recording, folder=folder, **FAST)

    sorting = ss.run_sorter("accm", recording, folder=folder, remove_existing_folder=True, **FAST)
    assert sorting.get_num_units() > 0
    assert (out / "sorting").is_dir()
    again = ss.read_sorter_folder(folder)
    assert again.get_num_units() == sorting.get_num_units()
    assert json.loads((folder / "spikeinterface_log.json").read_text())["error"] is False
