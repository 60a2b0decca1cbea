"""Registers the "accm" sorter as soon as ``spikeinterface.sorters`` is imported.

Loaded at interpreter start-up by ``accm_sorter_autoregister.pth`` so that fresh worker processes
(joblib, spawn pools, dask/slurm workers) know "accm" without an explicit ``import accm_sorter``.
It imports neither spikeinterface nor torch at start-up: it only watches for the import. Set
``ACCM_SORTER_NO_AUTOREGISTER=1`` to switch it off. It never breaks the spikeinterface import: a
failure to register is a warning.
"""

import importlib.abc
import os
import sys

TARGET = "spikeinterface.sorters"
OPT_OUT = "ACCM_SORTER_NO_AUTOREGISTER"


def _register():
    try:
        import accm_sorter  # noqa: F401  (registers on import)
    except Exception as err:  # pragma: no cover - depends on a broken install
        import warnings

        warnings.warn(f"accm-sorter could not register the 'accm' sorter: {err!r}", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec(fullname, path, target)
            except Exception:
                continue
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install():
    if os.environ.get(OPT_OUT, "").strip() not in ("", "0"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if TARGET in sys.modules:
        _register()
        return
    sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # pragma: no cover - start-up must never fail because of us
    pass
