"""SpikeInterface's numba kernels are compiled once and reused by later Python processes."""

import os
import subprocess
import sys
import textwrap

from accm_sorter.numba_cache import KERNEL_MODULES, cache_compiled_kernels


def test_every_kernel_a_sort_compiles_gets_a_disk_cache():
    from numba.core.caching import NullCache
    from spikeinterface.sortingcomponents.clustering import isosplit_isocut
    from spikeinterface.sortingcomponents.matching import tdc_peeler

    cached, problems = cache_compiled_kernels()
    assert problems == []
    # isosplit's 12 kernels, tdc-peeler's 3, the two peak detectors', template similarity's 2
    assert cached >= 19
    for kernel in (isosplit_isocut.isocut, isosplit_isocut.compare_pairs, tdc_peeler.numba_best_shift_sparse):
        assert not isinstance(kernel._cache, NullCache)
    assert cache_compiled_kernels() == (cached, [])  # a second call changes nothing


def test_a_module_that_does_not_import_is_reported_not_raised():
    cached, problems = cache_compiled_kernels(("spikeinterface.no_such_module", KERNEL_MODULES[0]))
    assert cached >= 1
    assert len(problems) == 1 and problems[0].startswith("spikeinterface.no_such_module")


def test_a_new_process_loads_a_kernel_compiled_by_an_earlier_one(tmp_path):
    # jisotonic5 is isosplit's smallest kernel: compiling it takes about a second
    script = textwrap.dedent("""
        import numpy as np
        from accm_sorter.numba_cache import cache_compiled_kernels
        from spikeinterface.sortingcomponents.clustering import isosplit_isocut as kernels
        cache_compiled_kernels()
        kernels.jisotonic5(np.arange(20.0)[::-1].copy(), np.ones(20))
        print(sum(kernels.jisotonic5.stats.cache_hits.values()), sum(kernels.jisotonic5.stats.cache_misses.values()))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), [run.stderr[-2000:] for run in runs]
    hits_misses = [tuple(int(x) for x in run.stdout.split()[-2:]) for run in runs]
    assert hits_misses == [(0, 1), (1, 0)]  # compiled and written by the first, read from disk by the second
    assert any((tmp_path / "numba").rglob("*.nbi"))
