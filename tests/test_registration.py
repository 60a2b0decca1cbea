"""The sorter is known to SpikeInterface by every route a lab uses."""

import os
import subprocess
import sys
import textwrap

import spikeinterface.sorters as ss
from spikeinterface.sorters import runsorter, sorterlist

from accm_sorter import ACCMSorter, __version__
from accm_sorter.params import default_params, params_description


def run_python(code, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.pop("ACCM_SORTER_NO_AUTOREGISTER", None)
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_registered_in_place():
    assert ACCMSorter in sorterlist.sorter_full_list
    assert sorterlist.sorter_dict["accm"] is ACCMSorter
    assert runsorter.sorter_dict is sorterlist.sorter_dict  # the dict run_sorter reads
    assert runsorter.sorter_dict["accm"] is ACCMSorter
    assert "accm" in ss.available_sorters()
    assert "accm" in ss.installed_sorters()
    assert sum(s.sorter_name == "accm" for s in sorterlist.sorter_full_list) == 1


def test_params_api_matches_single_source():
    assert ss.get_default_sorter_params("accm") == default_params()
    assert ss.get_sorter_params_description("accm") == params_description()
    assert set(params_description()) == set(default_params())
    assert ss.get_sorter_description("accm").startswith("accm")
    assert ACCMSorter.get_sorter_version() == __version__


def test_start_up_hook_registers_without_import_and_loads_nothing_heavy(tmp_path):
    out = run_python(
        """
        import sys
        heavy = [m for m in sys.modules if m.split('.')[0] in ('spikeinterface', 'torch', 'accm_sorter')]
        import spikeinterface.sorters as ss
        print(heavy, 'accm' in ss.available_sorters(), 'torch' in sys.modules)
        """,
        cwd=tmp_path,
    )
    assert out == "[] True False"


def test_start_up_hook_opt_out(tmp_path):
    out = run_python("import spikeinterface.sorters as ss; print('accm' in ss.available_sorters())",
                     env_extra={"ACCM_SORTER_NO_AUTOREGISTER": "1"}, cwd=tmp_path)
    assert out == "False"


def test_start_up_hook_never_breaks_spikeinterface(tmp_path):
    broken = tmp_path / "shadow" / "accm_sorter"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated broken accm install')\n")
    out = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import spikeinterface.sorters as ss
        print('tridesclous2' in ss.available_sorters(), 'accm' in ss.available_sorters(),
              any('could not register' in str(w.message) for w in caught))
        """,
        env_extra={"PYTHONPATH": str(tmp_path / "shadow")}, cwd=tmp_path,
    )
    assert out == "True False True"


def _defaults_in_fresh_process(_):
    import spikeinterface.sorters as ss

    return ss.get_default_sorter_params("accm")["detect_threshold"]


def test_spawned_workers_know_accm_without_import():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.map(_defaults_in_fresh_process, [0]) == [default_params()["detect_threshold"]]


def test_run_sorter_jobs_loop_and_read_sorter_folder(short_gt, tmp_path):
    recording, _ = short_gt
    from tests.conftest import FAST

    jobs = [dict(sorter_name="accm", recording=recording, folder=tmp_path / "job0", **FAST)]
    sortings = ss.run_sorter_jobs(jobs, engine="loop", return_output=True)
    assert len(sortings) == 1 and sortings[0].get_num_units() > 0
    again = ss.read_sorter_folder(tmp_path / "job0")
    assert again.get_num_units() == sortings[0].get_num_units()
    assert "main_channel_id" in again.get_property_keys()


def test_run_sorter_jobs_joblib_workers_register_themselves(short_gt, tmp_path):
    recording, _ = short_gt
    from tests.conftest import FAST

    jobs = [dict(sorter_name="accm", recording=recording, folder=tmp_path / f"job{i}", seed=i, **FAST)
            for i in range(2)]
    ss.run_sorter_jobs(jobs, engine="joblib", engine_kwargs=dict(n_jobs=2))
    for i in range(2):
        assert ss.read_sorter_folder(tmp_path / f"job{i}").get_num_units() > 0
