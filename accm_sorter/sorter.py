"""The SpikeInterface wrapper: ``ACCMSorter`` ("accm")."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from spikeinterface.sorters import BaseSorter
from spikeinterface.sorters.utils import SpikeSortingError

from . import __version__
from .params import default_params, params_description, validate_params
from .validation import check_recording

_FILES_WRITTEN_BY_INITIALIZE = {"spikeinterface_recording.json", "spikeinterface_recording.pickle",
                                "recording_attributes.json", "sorter_output"}


class ACCMSorter(BaseSorter):
    """ACCM: adaptive contrastive learning spike sorter (Qian et al., arXiv 2205.11914)."""

    sorter_name = "accm"
    requires_locations = True
    gpu_capability = "nvidia-optional"
    requires_binary_data = False
    handle_multi_segment = True
    compatible_with_parallel = {"loky": True, "multiprocessing": True, "threading": False}

    _default_params = default_params()
    _params_description = params_description()

    sorter_description = (
        "accm: self-supervised contrastive embedding of local multi-channel snippets (NT-Xent with spike "
        "augmentations), HDBSCAN clustering and a pairwise same-neuron classifier for assignment and merges."
    )
    installation_mesg = "pip install accm-sorter  (installs torch, hdbscan and scikit-learn)"

    @classmethod
    def is_installed(cls):
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "hdbscan", "sklearn"))

    @classmethod
    def get_sorter_version(cls):
        return __version__

    @classmethod
    def use_gpu(cls, params) -> bool:
        return params.get("device", "auto") != "cpu"

    @classmethod
    def initialize_folder(cls, recording, output_folder, verbose, remove_existing_folder):
        check_recording(recording)  # before any folder is written
        return super().initialize_folder(recording, output_folder, verbose, remove_existing_folder)

    @classmethod
    def set_params_to_folder(cls, recording, output_folder, new_params, verbose):
        try:
            validated = validate_params(dict(new_params))
            if validated["device"] == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise ValueError(
                        "device='cuda' was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'."
                    )
            return super().set_params_to_folder(recording, output_folder, validated, verbose)
        except (TypeError, ValueError):
            _remove_if_only_initialized(output_folder)
            raise

    @classmethod
    def _check_params(cls, recording, output_folder, params):
        params = validate_params(params)
        if params["pretrained_encoder"] is not None:
            from .encoder_io import check_encoder_fits, read_metadata, resolve_encoder_path

            path = resolve_encoder_path(params["pretrained_encoder"])
            fs = recording.sampling_frequency
            num_samples = int(round(params["ms_before"] * fs / 1000)) + int(round(params["ms_after"] * fs / 1000))
            num_channels = min(params["num_local_channels"], recording.get_num_channels())
            check_encoder_fits(read_metadata(path), num_channels, num_samples, str(path))
        if params["labels"] is not None:
            from .labels import check_labels, load_label_sorting

            check_labels(load_label_sorting(params["labels"]), recording)
        return params

    @classmethod
    def _setup_recording(cls, recording, sorter_output_folder, params, verbose):
        pass  # accm reads the recording lazily through SpikeInterface; nothing to convert

    @classmethod
    def _run_from_folder(cls, sorter_output_folder, params, verbose):
        from .pipeline import run_accm

        sorter_output_folder = Path(sorter_output_folder)
        recording = cls.load_recording_from_folder(sorter_output_folder.parent, with_warnings=False)
        try:
            run_accm(recording, validate_params(params), sorter_output_folder, verbose=verbose)
        except BaseException:
            # never leave a sorting behind that looks complete
            for name in ("sorting", "sorting.partial"):
                shutil.rmtree(sorter_output_folder / name, ignore_errors=True)
            raise

    @classmethod
    def _get_result_from_folder(cls, sorter_output_folder):
        from spikeinterface.core import load

        sorting_folder = Path(sorter_output_folder) / "sorting"
        if not sorting_folder.is_dir():
            raise SpikeSortingError(
                f"{sorting_folder} does not exist: the accm run in this folder did not finish. Run it again."
            )
        return load(sorting_folder)


def _remove_if_only_initialized(output_folder) -> None:
    """Undo initialize_folder when the parameters are rejected, so a corrected re-run can use the folder."""
    folder = Path(output_folder)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    sorter_output = folder / "sorter_output"
    if names <= _FILES_WRITTEN_BY_INITIALIZE and (not sorter_output.exists() or not any(sorter_output.iterdir())):
        shutil.rmtree(folder, ignore_errors=True)
