"""The SpikeInterface wrapper: ``ACCMSorter`` ("accm")."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
from spikeinterface.sorters import BaseSorter
from spikeinterface.sorters.utils import SpikeSortingError

from . import __version__
from .params import default_params, params_description, validate_params
from .sorting_tools import with_all_segments
from .validation import OutputFolderError, check_output_folder, check_recording

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
        if output_folder is None:
            output_folder = cls.sorter_name + "_output"  # SpikeInterface's default
        check_output_folder(output_folder, remove_existing_folder)
        try:
            return super().initialize_folder(recording, output_folder, verbose, remove_existing_folder)
        except OutputFolderError:
            raise
        except OSError as err:
            raise OutputFolderError(
                f"Could not write the output folder {Path(output_folder).absolute()} ({err}). Choose a folder=... "
                "on a disk you can write to, with free space."
            ) from err

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
        groups = channel_groups(recording) if params["split_by_group"] else []
        if len(groups) > 1 and params["labels"] is not None:
            raise ValueError(
                f"The recording has {len(groups)} channel groups (property 'group'), which accm sorts separately "
                "(split_by_group=True), and labels cannot be split by group. Set split_by_group=False to sort all "
                "channels together with these labels, or sort one group at a time "
                "(recording.split_by('group')) with labels curated on that group."
            )
        if params["pretrained_encoder"] is not None:
            from .encoder_io import check_encoder_fits, read_metadata, resolve_encoder_path

            path = resolve_encoder_path(params["pretrained_encoder"])
            fs = recording.sampling_frequency
            num_samples = int(round(params["ms_before"] * fs / 1000)) + int(round(params["ms_after"] * fs / 1000))
            if len(groups) > 1:
                counts = sorted({int(n) for n in np.unique(recording.get_property("group"), return_counts=True)[1]})
            else:
                counts = [recording.get_num_channels()]
            for count in counts:
                num_channels = min(params["num_local_channels"], count)
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
        _write_unfinished_log(sorter_output_folder.parent)
        recording = cls.load_recording_from_folder(sorter_output_folder.parent, with_warnings=False)
        params = validate_params(params)
        try:
            _drop_mixed_time_info(recording)
            groups = channel_groups(recording) if params["split_by_group"] else []
            if len(groups) > 1:
                run_by_group(recording, groups, params, sorter_output_folder, verbose)
            else:
                run_accm(recording, params, sorter_output_folder, verbose=verbose)
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


def channel_groups(recording) -> list:
    """The distinct values of the channel property 'group' (sorted); empty when there is none."""
    if "group" not in recording.get_property_keys():
        return []
    return list(np.unique(recording.get_property("group")))


def group_folder_names(groups) -> list[str]:
    """One sub-folder name per group: group_<g>, made safe for file systems and unique."""
    names = [f"group_{re.sub(r'[^A-Za-z0-9_.-]', '_', str(g))}" for g in groups]
    if len(set(names)) != len(names):
        names = [f"group_{k}" for k in range(len(groups))]
    return names


def run_by_group(recording, groups, params, sorter_output_folder: Path, verbose: bool = False):
    """Sort each channel group in sorter_output/group_<g>/ and write the aggregated sorting."""
    from spikeinterface.core import NumpySorting, aggregate_units, load

    from .pipeline import run_accm, write_sorting

    log_path = sorter_output_folder / "accm.log"
    log_path.write_text("", encoding="utf8")

    def note(message):
        line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {message}"
        with log_path.open("a", encoding="utf8") as f:
            f.write(line + "\n")
        if verbose:
            print(f"accm: {message}")

    sub_recordings = recording.split_by("group")
    names = group_folder_names(groups)
    note(f"channel property 'group' has {len(groups)} values: sorting each group separately "
         f"({', '.join(f'{n}: {sub_recordings[g].get_num_channels()} channels' for g, n in zip(groups, names))})")
    parts, main_ids, confidences, curated, unit_groups, group_unit_ids = [], [], [], [], [], []
    for group, name in zip(groups, names):
        folder = sorter_output_folder / name
        folder.mkdir()
        note(f"{name}: sorting {sub_recordings[group].get_num_channels()} channels in sorter_output/{name}/")
        run_accm(sub_recordings[group], params, folder, verbose=verbose)
        group_log = folder / "accm.log"
        if group_log.is_file():
            with log_path.open("a", encoding="utf8") as f:
                for line in group_log.read_text(encoding="utf8").splitlines():
                    f.write(f"[{name}] {line}\n")
        sorting = load(folder / "sorting")
        num_units = sorting.get_num_units()
        note(f"{name}: {num_units} units")
        if num_units == 0:
            continue  # an empty group adds nothing (and has no unit properties to aggregate)
        keys = sorting.get_property_keys()
        part = NumpySorting.from_sorting(sorting, with_metadata=False, copy_spike_vector=True)
        parts.append(with_all_segments(part, recording.get_num_segments()))
        main_ids.extend(sorting.get_property("main_channel_id"))
        confidences.extend(sorting.get_property("accm_mean_confidence"))
        curated.extend(sorting.get_property("accm_curated_unit_id") if "accm_curated_unit_id" in keys
                       else [""] * num_units)
        unit_groups.extend([group] * num_units)
        group_unit_ids.extend(sorting.unit_ids)
    if parts:
        aggregated = aggregate_units(parts, renamed_unit_ids=np.arange(len(main_ids), dtype="int64"))
        aggregated.set_property("group", np.asarray(unit_groups, dtype=recording.get_property("group").dtype))
        aggregated.set_property("accm_group_unit_id", np.asarray(group_unit_ids))
        sorting = NumpySorting.from_sorting(aggregated, with_metadata=True, copy_spike_vector=True)
    else:
        sorting = NumpySorting.from_unit_dict([{} for _ in range(recording.get_num_segments())],
                                              recording.sampling_frequency)
    sorting = with_all_segments(sorting, recording.get_num_segments())
    write_sorting(sorting, sorter_output_folder, np.asarray(main_ids), confidences, curated)
    note(f"{len(main_ids)} units in {len(groups)} groups, written to sorter_output/sorting")
    return sorting


def _drop_mixed_time_info(recording) -> None:
    """accm works in samples. When some segments carry a start time and others none, SpikeInterface's in-memory
    cache (recording.save(format='memory')) fails on float(None): forget the times of this in-run copy (the
    user's recording and the one registered to the sorting keep theirs)."""
    t_starts = recording.get_segment_t_starts()
    if t_starts is not None and any(t is None for t in t_starts):
        recording.reset_times()


def _write_unfinished_log(output_folder: Path) -> None:
    """A spikeinterface_log.json that marks the run as failed until SpikeInterface overwrites it at the end: a
    run that is killed (SIGKILL, out of memory, power cut) leaves a folder that says it did not finish."""
    now = datetime.datetime.now()
    log = dict(
        sorter_name=ACCMSorter.sorter_name,
        sorter_version=__version__,
        datetime=now.isoformat(timespec="seconds"),
        runtime_trace=[],
        error=True,
        run_time=None,
        error_trace=[
            f"The accm run started at {now:%Y-%m-%d %H:%M:%S} did not finish: it was interrupted (killed, out of "
            "memory, machine stopped) or is still running. Run it again with remove_existing_folder=True."
        ],
    )
    (Path(output_folder) / "spikeinterface_log.json").write_text(json.dumps(log, indent=4), encoding="utf8")


def _remove_if_only_initialized(output_folder) -> None:
    """Undo initialize_folder when the parameters are rejected, so a corrected re-run can use the folder."""
    folder = Path(output_folder)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    sorter_output = folder / "sorter_output"
    if names <= _FILES_WRITTEN_BY_INITIALIZE and (not sorter_output.exists() or not any(sorter_output.iterdir())):
        shutil.rmtree(folder, ignore_errors=True)
