"""Keep SpikeInterface's numba kernels compiled on disk between Python processes.

SpikeInterface jit-compiles its detection, isosplit and tdc-peeler kernels without numba's
``cache=True``, so every new Python process compiles them again the first time they run: isosplit
alone took 37 s on an 8-channel, 8-second recording (2-core CPU), and a whole accm sort there 86 s, of
which 59 s were the discovery stage's first isosplit call. ``run_sorter`` in a fresh session, every
CLI call and every joblib worker paid it. Numba's own switch for ``cache=True``,
``Dispatcher.enable_caching``, turned on before a kernel's first call, writes the compiled code
next to SpikeInterface's modules (or in the user's cache directory where those are read-only, or in
``NUMBA_CACHE_DIR``); numba checks the source file's time stamp and the CPU before reusing it.
"""

from __future__ import annotations

import importlib

# the SpikeInterface modules whose kernels a sort compiles (found by listing the dispatchers with
# compiled signatures after a default sort)
KERNEL_MODULES = (
    "spikeinterface.sortingcomponents.peak_detection.locally_exclusive",
    "spikeinterface.sortingcomponents.peak_detection.matched_filtering",
    "spikeinterface.sortingcomponents.clustering.isosplit_isocut",
    "spikeinterface.sortingcomponents.matching.tdc_peeler",
    "spikeinterface.postprocessing.template_similarity",
)


def cache_compiled_kernels(modules=KERNEL_MODULES) -> tuple[int, list[str]]:
    """Turn on numba's disk cache for every jitted function defined in ``modules``.

    Returns (number of kernels now cached, problems): a module that does not import or a kernel numba
    cannot cache (no writable cache location) is left as it is, and named in ``problems``; sorting
    works the same without the cache, only slower to start.
    """
    try:
        from numba.core.dispatcher import Dispatcher
        from numba.core.caching import NullCache
    except ImportError:
        return 0, ["numba is not installed"]
    cached, problems = 0, []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # a SpikeInterface version without this module
            problems.append(f"{name}: {error}")
            continue
        for attribute, kernel in vars(module).items():
            if not isinstance(kernel, Dispatcher) or getattr(kernel, "__module__", None) != name:
                continue
            try:
                # ``_cache`` is numba's own attribute: a numba without it is reported here, not raised
                if isinstance(kernel._cache, NullCache):
                    kernel.enable_caching()
                cached += 1  # or cache=True in SpikeInterface, or turned on earlier in this process
            except Exception as error:  # numba found no writable place for the cache
                problems.append(f"{name}.{attribute}: {error}")
    return cached, problems
