"""The accm pipeline, one stage after another.

preprocess -> detect -> snippets -> contrastive training -> embedding -> HDBSCAN clustering ->
pairwise classifier (assignment + confidence) -> pairwise cluster merges -> curation -> outputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .cluster import cluster_features, fit_feature_scaling
from .curation import remove_duplicate_spikes, remove_rare_units
from .detect import detect_spikes, estimate_noise_levels, spike_prototype
from .encoder_io import save_encoder
from .numba_cache import cache_compiled_kernels
from .overlaps import refractory_repeats, residual_recording, resolve_overlaps, template_amplitude_scale
from .pairwise import assign_spikes, build_prototypes, group_templates, merge_clusters, train_spike_classifier
from .preprocess import cache_recording, motion_span_um, preprocess_recording, probe_displacement
from .sorting_tools import distance_to_nearest, global_sample_index, time_ordered, with_all_segments
from .snippets import (
    estimate_locations,
    extract_snippets,
    local_channel_table,
    recentre_table,
    spike_free_times,
)

NUM_NOISE_SNIPPETS = 2000
NUM_AUGMENTED_POSITIVES = 4000
SPATIAL_JITTER_CENTRES = 5
RESIDUAL_BLOCK_PEAKS = 50_000


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    return torch.device(name)


def make_logger(sorter_output_folder: Path, verbose: bool) -> logging.Logger:
    logger = logging.getLogger(f"accm.{id(sorter_output_folder)}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(sorter_output_folder / "accm.log", mode="w", encoding="utf8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    if verbose:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("accm: %(message)s"))
        logger.addHandler(stream)
    return logger


class StageTimer:
    def __init__(self, log):
        self.log = log
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._name = None

    def start(self, name: str):
        self._close()
        self._name = name
        self._t0 = time.perf_counter()
        self.log(f"stage {name} ...")

    def _close(self):
        if self._name is not None:
            elapsed = time.perf_counter() - self._t0
            # a stage entered twice (matching, before and after discovery) adds up
            self.timings[self._name] = self.timings.get(self._name, 0.0) + elapsed
            self.log(f"stage {self._name} done in {elapsed:.2f} s")
            self._name = None

    def finish(self):
        self._close()
        return self.timings


def with_new_units(new_templates, to_final, main_channels, confidence_by_unit, curated_ids, num_units):
    """The per-unit arrays of the sorting extended by units found after clustering (``new_templates``):
    each new unit is its own final unit, has its template's biggest channel, and no classifier confidence."""
    num_new = len(new_templates.unit_ids)
    return (np.concatenate([to_final, num_units + np.arange(num_new)]),
            np.concatenate([main_channels, np.abs(new_templates.get_dense_templates()).max(axis=1).argmax(axis=1)]),
            np.concatenate([confidence_by_unit, np.full(num_new, np.nan)]),
            np.concatenate([curated_ids, np.full(num_new, "", dtype=object)]),
            num_units + num_new)


def with_split_units(parents, main_channels, confidence_by_unit, curated_ids, num_units):
    """The per-unit arrays of the sorting extended by units split off the end of matching's units: each new unit
    (numbered from ``num_units``) has the main channel of its parent in ``parents`` and no classifier confidence."""
    return (np.concatenate([main_channels, main_channels[parents]]),
            np.concatenate([confidence_by_unit, np.full(parents.size, np.nan)]),
            np.concatenate([curated_ids, np.full(parents.size, "", dtype=object)]),
            num_units + parents.size)


def build_sorting(spikes, sampling_frequency, num_units, num_segments):
    from spikeinterface.core import NumpySorting

    per_segment = []
    for seg in range(num_segments):
        in_seg = spikes[spikes["segment_index"] == seg]
        per_segment.append({u: np.sort(in_seg["sample_index"][in_seg["unit_index"] == u]) for u in range(num_units)})
    return with_all_segments(NumpySorting.from_unit_dict(per_segment, sampling_frequency), num_segments)


def spikes_from_labels(peaks, labels):
    """The classified peaks as a spike array (what the sorting holds when template matching is off)."""
    from .matching import spike_dtype

    assigned = np.flatnonzero(labels >= 0)
    spikes = np.zeros(assigned.size, dtype=spike_dtype)
    spikes["sample_index"] = peaks["sample_index"][assigned]
    spikes["segment_index"] = peaks["segment_index"][assigned]
    spikes["unit_index"] = labels[assigned]
    spikes["amplitude"] = 1.0
    return spikes


def keep_labelled_spikes(spikes, label_data, censor_samples):
    """Curated spikes stay in their unit at their time: add those matching missed, replace its near matches.

    Curated unit k is unit k of ``spikes``. Only unit k's own matches within ``censor_samples`` of a
    labelled spike are replaced: another unit's spike there is a collision the labels say nothing
    about (dropping them cost every neighbour 0.2-1 % accuracy on low-snr).
    """
    from .matching import spike_dtype

    forced = np.zeros(label_data.sample_index.size, dtype=spike_dtype)
    forced["sample_index"] = label_data.sample_index
    forced["segment_index"] = label_data.segment_index
    forced["unit_index"] = label_data.unit_index
    forced["amplitude"] = 1.0
    clash = np.zeros(spikes.size, dtype=bool)
    for seg, unit in {(int(s), int(u)) for s, u in zip(forced["segment_index"], forced["unit_index"])}:
        mine = np.flatnonzero((spikes["segment_index"] == seg) & (spikes["unit_index"] == unit))
        times = np.sort(forced["sample_index"][(forced["segment_index"] == seg) & (forced["unit_index"] == unit)])
        clash[mine] = distance_to_nearest(times, spikes["sample_index"][mine]) < censor_samples
    return time_ordered(spikes[~clash], forced)


def drop_rare_units(spikes, total_duration_s, min_firing_rate, protected=()):
    """Remove units below ``min_firing_rate`` (except ``protected``); renumber the rest.

    Returns (spikes, kept old unit numbers).
    """
    new_index = remove_rare_units(spikes["unit_index"], total_duration_s, min_firing_rate, protected)
    keep = new_index >= 0
    kept = np.unique(spikes["unit_index"][keep])
    spikes = spikes[keep].copy()
    spikes["unit_index"] = new_index[keep]
    return spikes, kept


def write_sorting(sorting, sorter_output_folder: Path, main_channel_ids, confidence_by_unit, curated_ids=None):
    """Save the sorting last and atomically: a folder named 'sorting' is always complete."""
    if len(main_channel_ids):
        sorting.set_property("main_channel_id", np.asarray(main_channel_ids))
        sorting.set_property("accm_mean_confidence", np.asarray(confidence_by_unit, dtype="float64"))
        if curated_ids is not None and any(curated_ids):
            sorting.set_property("accm_curated_unit_id", np.asarray(curated_ids))
    tmp = sorter_output_folder / "sorting.partial"
    final = sorter_output_folder / "sorting"
    for path in (tmp, final):
        if path.exists():
            shutil.rmtree(path)
    with warnings.catch_warnings():
        # a NumpySorting has no provenance to save; SpikeInterface says so on every save
        warnings.filterwarnings("ignore", message="The extractor is not serializable")
        sorting.save(folder=tmp)
    os.replace(tmp, final)


def empty_result(recording, sorter_output_folder, reason: str, log):
    from spikeinterface.core import NumpySorting

    warnings.warn(f"accm: {reason} Returning an empty sorting.", stacklevel=2)
    log(f"empty sorting: {reason}")
    sorting = with_all_segments(NumpySorting.from_unit_dict([{} for _ in range(recording.get_num_segments())],
                                                            recording.sampling_frequency),
                                recording.get_num_segments())
    write_sorting(sorting, sorter_output_folder, [], [])
    return sorting


def join_duplicates(spikes, labels, preprocessed, recording, motion, channel_locations, main_channels, to_final,
                    num_units, noise_levels, params, job_kwargs, protected, log):
    """``labels`` of the peaks once the matched units that are one neuron are joined; ``spikes`` take their unit's
    representative in place (``matching.join_duplicate_units``)."""
    from .matching import join_duplicate_units

    representative = np.arange(len(to_final))
    # each spike at its unit's depth: a matched spike has no channel of its own
    positions = probe_displacement(recording, motion, spikes["sample_index"], spikes["segment_index"],
                                   channel_locations[main_channels[to_final[spikes["unit_index"]]], 1])
    found = join_duplicate_units(preprocessed, spikes, noise_levels, params, job_kwargs, protected=protected,
                                 positions=positions, log=log)
    representative[:found.size] = found
    spikes["unit_index"] = representative[spikes["unit_index"]]
    final_map = np.arange(num_units)
    final_map[to_final] = to_final[representative]
    return np.where(labels >= 0, final_map[labels], -1)


def drop_copies_between_sorted_units(recording, spikes, num_units, noise_levels, params, job_kwargs, protected=(),
                                     log=None):
    """``spikes`` (numbered by sorted unit) less the copies between the sorted units (``matching.drop_copied_spikes``,
    with each sorted unit's template on every channel).

    The first copy test runs between matching's units, before the joins; a copy between two neurons
    that were each matched as several pieces, or that the reassignment between alike units made,
    shows only once the pieces are one unit (dense-overlap 2002: GT 19's unit held 85 spikes within
    +-3 samples of GT 16's, 15 expected by chance, none flagged before the joins).
    """
    from .matching import drop_copied_spikes, unit_templates

    templates = unit_templates(recording, spikes, spikes["unit_index"], num_units, noise_levels, params, job_kwargs,
                               sparse=False)
    spikes, num_dropped = drop_copied_spikes(recording, templates, spikes, noise_levels, params, protected=protected,
                                             log=log)
    if log is not None:
        log(f"copies between the sorted units (after the joins): {num_dropped} spikes dropped")
    return spikes


def run_accm(recording, params: dict, sorter_output_folder: Path, verbose: bool = False):
    """Sort ``recording`` with validated ``params``; write everything under ``sorter_output_folder``."""
    import torch
    from spikeinterface.core import fix_job_kwargs

    sorter_output_folder = Path(sorter_output_folder)
    logger = make_logger(sorter_output_folder, verbose)
    log = logger.info
    timer = StageTimer(log)
    device = resolve_device(params["device"])
    seed = params["seed"]
    rng = np.random.default_rng(seed)
    # Chunked SpikeInterface stages run in this process by default: worker processes each load the
    # scientific stack, which on probe32 (120 s, 2 cores) doubled peak RSS (1.4 -> 3.2 GiB) and cost more
    # CPU time than it saved. Torch uses every core unless n_jobs is given.
    job_kwargs = dict(n_jobs=1, chunk_duration="1s", progress_bar=verbose)
    job_kwargs.update(params["job_kwargs"])
    job_kwargs = fix_job_kwargs(job_kwargs)
    torch_threads = int(job_kwargs["n_jobs"]) if "n_jobs" in params["job_kwargs"] else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, torch_threads))
    sampling_frequency = recording.sampling_frequency
    channel_locations = recording.get_channel_locations()[:, :2]
    num_channels = recording.get_num_channels()
    log(f"accm {__version__} on {num_channels} channels, {recording.get_total_duration():.1f} s, device {device}, "
        f"job_kwargs {job_kwargs}")
    # before any kernel's first call in this process: a fresh process would otherwise compile them again
    num_kernels, problems = cache_compiled_kernels()
    log(f"numba disk cache on for {num_kernels} SpikeInterface kernels"
        + (f"; not cached: {'; '.join(problems)}" if problems else ""))

    timer.start("preprocess")
    preprocessed, motion = preprocess_recording(recording, params, sorter_output_folder / "motion", job_kwargs)
    preprocessed, cache_info = cache_recording(
        preprocessed, params["cache_preprocessing"], sorter_output_folder / "preprocessed", job_kwargs
    )

    timer.start("detect")
    noise_levels = estimate_noise_levels(preprocessed, seed, job_kwargs)
    prototype = spike_prototype(preprocessed, noise_levels, params, job_kwargs)
    peaks = detect_spikes(preprocessed, noise_levels, params, job_kwargs, prototype)
    log(f"{peaks.size} spikes detected ({'matched filter' if prototype is not None else 'plain threshold'})")
    if peaks.size < params["min_spikes"]:
        timer.finish()
        return empty_result(recording, sorter_output_folder,
                            f"only {peaks.size} spikes crossed detect_threshold={params['detect_threshold']} "
                            f"(min_spikes={params['min_spikes']}); lower detect_threshold if you expect more.", log)

    peak_units = np.full(peaks.size, -1, dtype="int64")  # curated unit of each peak, -1 = unlabelled
    label_data, missed_labels = None, None
    if params["labels"] is not None:
        from .labels import check_labels, label_peaks, load_label_sorting

        label_data = check_labels(load_label_sorting(params["labels"]), recording)
        peak_units, missed_labels = label_peaks(peaks, label_data, sampling_frequency)
        log(f"labels: {label_data.unit_ids.size} curated units, {label_data.sample_index.size} labelled spikes, "
            f"{int((peak_units >= 0).sum())} peaks labelled, {missed_labels.size} not detected")
    # the supervised contrastive term is opt-in: it moves the encoder, and with it the unlabelled units
    supervised = label_data is not None and params["labels_weight"] > 0
    labelled = np.flatnonzero(peak_units >= 0)

    timer.start("snippets")
    nbefore = int(round(params["ms_before"] * sampling_frequency / 1000))
    nafter = int(round(params["ms_after"] * sampling_frequency / 1000))
    table = local_channel_table(channel_locations, params["num_local_channels"])
    wide_table = local_channel_table(channel_locations, min(num_channels, 3 * table.shape[1]))
    snippets = extract_snippets(preprocessed, peaks, table, nbefore, nafter, job_kwargs)
    locations = estimate_locations(snippets, table, peaks, channel_locations, nbefore)
    noise_entries = spike_free_times(peaks, preprocessed, nbefore, nafter, NUM_NOISE_SNIPPETS, rng)
    noise_snippets = extract_snippets(preprocessed, noise_entries, table, nbefore, nafter, job_kwargs)
    train_index = np.sort(rng.choice(peaks.size, min(peaks.size, params["train_max_spikes"]), replace=False))
    if supervised:
        train_index = np.union1d(train_index, labelled)
    wide_snippets = extract_snippets(preprocessed, peaks[train_index], wide_table, nbefore, nafter, job_kwargs)
    remap = recentre_table(wide_table, table, SPATIAL_JITTER_CENTRES)
    log(f"snippets {snippets.shape}, {noise_snippets.shape[0]} noise snippets, {train_index.size} training spikes")

    timer.start("train")
    from .train import embed, train_encoder

    initial_encoder = None
    if params["pretrained_encoder"] is not None:
        from .encoder_io import load_encoder

        initial_encoder, _ = load_encoder(params["pretrained_encoder"], table.shape[1], nbefore + nafter)
        log(f"starting from pretrained encoder {params['pretrained_encoder']} "
            f"({params['pretrained_train_steps']} fine-tuning steps)")
    encoder, losses = train_encoder(
        wide_snippets, peaks["channel_index"][train_index], remap, noise_snippets, params, sampling_frequency,
        device, verbose=verbose, initial_encoder=initial_encoder,
        spike_labels=peak_units[train_index] if supervised else None,
    )
    del wide_snippets
    if losses:
        log(f"contrastive loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} over {len(losses)} steps")

    timer.start("embed")
    t_embed = time.perf_counter()
    embeddings = embed(encoder, snippets, device)
    embed_rate = snippets.shape[0] / max(time.perf_counter() - t_embed, 1e-9)
    log(f"encoder inference {embed_rate:,.0f} spikes/s")

    timer.start("cluster")
    scaling = fit_feature_scaling(embeddings, params["location_scale_um"])
    features = scaling.transform(embeddings, locations)
    cluster_index = np.sort(rng.choice(peaks.size, min(peaks.size, params["cluster_max_spikes"]), replace=False))
    sub_labels, sub_probs = cluster_features(features[cluster_index], params["min_cluster_size"],
                                             int(job_kwargs["n_jobs"]))
    num_clusters = int(sub_labels.max()) + 1
    log(f"HDBSCAN: {num_clusters} clusters, {np.mean(sub_labels < 0):.1%} of clustered spikes left as noise")
    if num_clusters == 0:
        timer.finish()
        return empty_result(recording, sorter_output_folder,
                            "HDBSCAN found no cluster (too few spikes or no structure).", log)

    timer.start("pairwise")
    amplitudes = peaks["amplitude"].astype("float32")
    protos = build_prototypes(features[cluster_index], amplitudes[cluster_index], sub_labels, sub_probs, num_clusters)
    aug_feats, aug_amps, aug_labels = augmented_positives(
        encoder, snippets, peaks, table, channel_locations, nbefore, noise_snippets, scaling,
        cluster_index, sub_labels, sub_probs, params, sampling_frequency, device, rng,
    )
    classifier = train_spike_classifier(
        np.vstack([features[cluster_index], aug_feats]),
        np.concatenate([amplitudes[cluster_index], aug_amps]),
        np.concatenate([sub_labels, aug_labels]),
        protos, seed, device,
    )
    labels, confidence = assign_spikes(classifier, features, amplitudes, protos, params["assign_threshold"], device)
    log(f"pairwise assignment: {np.mean(labels >= 0):.1%} of detected spikes assigned, "
        f"median confidence {np.median(confidence):.3f}")

    global_samples, total_samples = global_sample_index(peaks, recording)
    labels, merge_report = merge_clusters(
        labels, snippets, peaks["channel_index"], table, features, amplitudes, global_samples, num_channels,
        params["embedding_dim"], total_samples, sampling_frequency, params["merge_threshold"],
        params["min_cluster_size"], seed, log=log,
    )
    log(f"pairwise merges: {merge_report['num_clusters_before']} -> "
        f"{merge_report.get('num_clusters_after', merge_report['num_clusters_before'])} clusters")

    if params["resolve_overlaps"]:
        timer.start("overlaps")
        from spikeinterface.core import get_channel_distances

        cluster_to_unit = np.asarray(merge_report["cluster_map"], dtype="int64")
        num_merged = int(labels.max()) + 1 if labels.max() >= 0 else 0
        unit_templates = group_templates(snippets, peaks["channel_index"], table,
                                         [np.flatnonzero(labels == u) for u in range(num_merged)], num_channels,
                                         seed=seed)

        def reassign_peaks(which_peaks, residuals):
            locs = estimate_locations(residuals, table, which_peaks, channel_locations, nbefore)
            feats = scaling.transform(embed(encoder, residuals, device), locs)
            amps = peak_amplitude(residuals, nbefore, params["peak_sign"])
            new, conf = assign_spikes(classifier, feats, amps, protos, params["assign_threshold"], device)
            return np.where(new >= 0, cluster_to_unit[np.clip(new, 0, None)], -1), conf

        def reassign(index, residuals):
            return reassign_peaks(peaks[index], residuals)

        labels, confidence, overlap_report = resolve_overlaps(
            snippets, unit_templates, labels, confidence, peaks["channel_index"], table, global_samples,
            get_channel_distances(recording), nbefore,
            max_lag=int(round(params["overlap_max_lag_ms"] * sampling_frequency / 1000)),
            radius_um=params["overlap_radius_um"], reassign=reassign,
        )
        log(f"overlaps: {overlap_report['overlapping_spikes']} overlapping spikes peeled, "
            f"{overlap_report['reassigned']} re-assigned, {overlap_report['recovered']} recovered from noise")

        # spikes that detection never saw because a bigger one masked them: detect on the residual
        # (threshold 1.0 switches this off; the classifier's float32 sigmoid can reach exactly 1.0,
        # so the switch skips the step instead of relying on the comparison)
        if params["masked_spike_threshold"] < 1.0:
            scales = np.ones(peaks.size, dtype="float32")
            assigned = np.flatnonzero(labels >= 0)
            scales[assigned] = template_amplitude_scale(snippets, unit_templates, labels, peaks["channel_index"],
                                                        table, assigned)
            residual = residual_recording(preprocessed, unit_templates, nbefore, peaks, labels, scales)
            new_peaks = detect_spikes(residual, noise_levels, params, job_kwargs, prototype)
            refractory = int(round(params["overlap_max_lag_ms"] * sampling_frequency / 1000))
            kept = []
            # in blocks: the residual has as many peaks as the recording, and only a few are kept
            for start in range(0, new_peaks.size, RESIDUAL_BLOCK_PEAKS):
                block = new_peaks[start:start + RESIDUAL_BLOCK_PEAKS]
                block_snippets = extract_snippets(residual, block, table, nbefore, nafter, job_kwargs)
                block_labels, block_confidence = reassign_peaks(block, block_snippets)
                block_global, _ = global_sample_index(block, recording)
                repeat = refractory_repeats(block_global, block_labels, global_samples, labels, refractory)
                keep = (block_labels >= 0) & ~repeat & (block_confidence >= params["masked_spike_threshold"])
                kept.append((block[keep], block_labels[keep], block_confidence[keep], block_snippets[keep]))
                del block_snippets
            num_kept = sum(part[0].size for part in kept)
            overlap_report["masked_recovered"] = num_kept
            log(f"residual detection: {new_peaks.size} peaks, {num_kept} kept as masked spikes")
            if num_kept:
                kept_snippets = np.concatenate([part[3] for part in kept])
                peaks = np.concatenate([peaks] + [part[0] for part in kept])
                labels = np.concatenate([labels] + [part[1] for part in kept])
                confidence = np.concatenate([confidence] + [part[2] for part in kept])
                embeddings = np.concatenate([embeddings, embed(encoder, kept_snippets, device)])
                snippets = np.concatenate([snippets, kept_snippets])
                del kept_snippets
                global_samples, _ = global_sample_index(peaks, recording)
            del kept, new_peaks, residual
        merge_report["overlaps"] = overlap_report


    timer.start("curate")
    censor = max(1, int(round(2 * params["exclude_sweep_ms"] * sampling_frequency / 1000)))
    labels = remove_duplicate_spikes(labels, global_samples, confidence, censor)
    labels = remove_rare_units(labels, recording.get_total_duration(), params["min_firing_rate"])
    num_units = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    if num_units == 0:
        timer.finish()
        return empty_result(recording, sorter_output_folder, "no unit survived assignment and curation.", log)
    if params["split_max_similarity"] > 0:
        from .split import split_mixed_units, waveforms_from_snippets, waveforms_from_traces

        if params["split_waveforms"] == "unit_channels":
            waveforms_of = waveforms_from_traces(preprocessed, peaks, labels, table, nbefore, nafter, job_kwargs)
        else:
            waveforms_of = waveforms_from_snippets(snippets, peaks["channel_index"], table)
        labels, split_report = split_mixed_units(labels, waveforms_of, params["min_cluster_size"],
                                                 params["split_max_similarity"], seed,
                                                 max_depth=params["split_max_depth"],
                                                 clusterer=params["split_clusterer"], log=log)
        del waveforms_of  # with 'unit_channels' it holds a waveform of every spike
        merge_report["splits"] = split_report
        num_units = int(labels.max()) + 1
    if params["duplicate_min_similarity"] < 1.0:
        from .split import merge_duplicate_units

        templates = group_templates(snippets, peaks["channel_index"], table,
                                    [np.flatnonzero(labels == u) for u in range(num_units)], num_channels, seed=seed)
        positions = probe_displacement(recording, motion, peaks["sample_index"], peaks["segment_index"],
                                       channel_locations[peaks["channel_index"], 1])
        labels, duplicate_report = merge_duplicate_units(labels, templates, global_samples, total_samples,
                                                         sampling_frequency, params["duplicate_min_similarity"],
                                                         join_drift_splits=params["join_drift_splits"],
                                                         positions=positions, noise_levels=noise_levels, log=log)
        merge_report["duplicates"] = duplicate_report
        num_units = int(labels.max()) + 1
    num_curated, labelled_only = 0, np.zeros(0, dtype="int64")
    template_labels, to_final = labels, np.arange(num_units)  # matching's unit numbers -> the sorting's
    if label_data is not None:
        timer.start("curated")
        from .curated import claim_units
        from .labels import peaks_for_missed_labels

        num_curated = int(label_data.unit_ids.size)
        peak_units = np.concatenate([peak_units, np.full(peaks.size - peak_units.size, -1)])  # + masked spikes
        extra = peaks_for_missed_labels(peaks, peak_units, label_data, missed_labels)
        if extra.size:
            extra_snippets = extract_snippets(preprocessed, extra, table, nbefore, nafter, job_kwargs)
            extra["amplitude"] = peak_amplitude(extra_snippets, nbefore, params["peak_sign"])
            snippets = np.concatenate([snippets, extra_snippets])
            peaks = np.concatenate([peaks, extra])
            peak_units = np.concatenate([peak_units, label_data.unit_index[missed_labels]])
            labels = np.concatenate([labels, np.full(extra.size, -1)])
            confidence = np.concatenate([confidence, np.ones(extra.size, dtype=confidence.dtype)])
        template_labels = labels  # the units as accm found them
        labels, new_id, num_units, claimed_by = claim_units(labels, peak_units, num_curated)
        labelled_only = np.setdiff1d(np.arange(num_curated), claimed_by)
        # Template matching runs on the units as accm found them, in their order, so it finds the
        # unlabelled units' spikes exactly as without labels; the curated units accm never found come
        # after them, with the templates of their labelled spikes, and are renumbered afterwards.
        to_final = np.concatenate([new_id, labelled_only]).astype("int64")
        labelled = np.flatnonzero(peak_units >= 0)
        confidence[labelled] = 1.0
        log(f"curated units: {int((claimed_by >= 0).sum())} units claimed by {num_curated} curated units, "
            f"{extra.size} undetected labelled spikes added; {num_units} units, {labelled_only.size} curated units "
            f"known only from their labels")
        merge_report["curated"] = dict(claimed_by=claimed_by.tolist(), undetected_labelled_spikes=int(extra.size))
    units = [np.flatnonzero(labels == u) for u in range(num_units)]
    templates = group_templates(snippets, peaks["channel_index"], table, units, num_channels, seed=seed)
    main_channels = np.abs(templates).max(axis=2).argmax(axis=1)
    del templates
    confidence_by_unit = np.array([float(confidence[idx].mean()) for idx in units])
    curated_ids = np.full(num_units, "", dtype=object)
    if num_curated:
        curated_ids[:num_curated] = [str(unit_id) for unit_id in label_data.unit_ids]
    log(f"{num_units} units, {int((labels >= 0).sum())} classified spikes")
    if params["save_embeddings"]:
        np.save(sorter_output_folder / "embeddings.npy", embeddings.astype("float16"))
    # From here on only the traces, the peaks and their labels are needed. The per-spike arrays
    # (snippets alone are 1.7 kB a spike) made peak memory grow with the recording's duration.
    del snippets, embeddings, features, locations, amplitudes

    if params["matching_method"] != "none":
        timer.start("matching")
        from .matching import match_spikes, rescale_templates, unit_templates

        # a curated unit accm never found has a template from a few labelled spikes: matched with the
        # others it would take their spikes; it gets its own, FDR-controlled pass below
        num_found = len(to_final) - labelled_only.size
        matching_templates = unit_templates(preprocessed, peaks, template_labels, num_found, noise_levels, params,
                                            job_kwargs)
        spikes = match_spikes(preprocessed, matching_templates, noise_levels, params, job_kwargs)
        log(f"template matching ({params['matching_method']}): {spikes.size} spikes of "
            f"{len(matching_templates.unit_ids)} units")
        small_units = None
        if params["discover_units"]:
            timer.start("discover")
            from .discover import discover_units, match_with_discovered

            curated_rows = np.flatnonzero(to_final < num_curated)  # matching unit ids of curated units
            # new units are numbered after every unit of the sorting, curated-only ones included
            discovered, small_units = discover_units(preprocessed, matching_templates, spikes, noise_levels, params,
                                                     job_kwargs, first_unit_id=len(to_final), log=log)
            if discovered is not None:
                timer.start("matching")
                spikes, discovered, matching_templates = match_with_discovered(
                    preprocessed, matching_templates, discovered, spikes, noise_levels, params, job_kwargs, censor,
                    protected=curated_rows, log=log)
            if discovered is not None:
                to_final, main_channels, confidence_by_unit, curated_ids, num_units = with_new_units(
                    discovered, to_final, main_channels, confidence_by_unit, curated_ids, num_units)
                log(f"template matching with {len(discovered.unit_ids)} discovered units: {spikes.size} spikes of "
                    f"{len(matching_templates.unit_ids)} units")
        if params["split_matched_units"]:
            timer.start("matching")
            from .matching import split_matched_units

            displacement = None if motion is None else (
                lambda samples, segments, depths: probe_displacement(recording, motion, samples, segments, depths))
            matching_templates, num_new = split_matched_units(
                preprocessed, matching_templates, spikes, table, nbefore, nafter, noise_levels, params, job_kwargs,
                first_unit_id=len(to_final), protected=np.flatnonzero(to_final < num_curated),
                displacement=displacement, log=log)
            if num_new:
                new_units = matching_templates.select_units(matching_templates.unit_ids[-num_new:])
                to_final, main_channels, confidence_by_unit, curated_ids, num_units = with_new_units(
                    new_units, to_final, main_channels, confidence_by_unit, curated_ids, num_units)
                spikes = match_spikes(preprocessed, matching_templates, noise_levels, params, job_kwargs)
                log(f"template matching with {num_new} units split off: {spikes.size} spikes of "
                    f"{len(matching_templates.unit_ids)} units")
        if params["template_rescaling_passes"]:
            timer.start("matching")
        for _ in range(params["template_rescaling_passes"]):
            matching_templates, num_rescaled = rescale_templates(matching_templates, spikes)
            if num_rescaled == 0:  # the same templates would match the same spikes
                break
            spikes = match_spikes(preprocessed, matching_templates, noise_levels, params, job_kwargs)
            log(f"template matching with {num_rescaled} templates rescaled to their spikes' median amplitude: "
                f"{spikes.size} spikes of {len(matching_templates.unit_ids)} units")
        from .matching import drop_absorbed_templates

        matching_templates, spikes = drop_absorbed_templates(
            preprocessed, matching_templates, spikes, noise_levels, params, job_kwargs, params["min_cluster_size"],
            protected=np.flatnonzero(to_final < num_curated), log=log)
        if params["hidden_spike_passes"]:
            timer.start("matching")
            from .matching import match_hidden_spikes
        for _ in range(params["hidden_spike_passes"]):
            spikes, num_hidden = match_hidden_spikes(preprocessed, matching_templates, spikes, noise_levels, params,
                                                     job_kwargs, censor)
            log(f"template matching on the residual: {num_hidden} spikes hidden under others")
            if num_hidden == 0:
                break
        if small_units is not None:
            from .discover import keep_small_units

            # after every matching pass: matching again would drop the spikes it cannot see
            spikes, small_units = keep_small_units(preprocessed, spikes, small_units, len(to_final), censor, params,
                                                   protected=np.flatnonzero(to_final < num_curated), log=log)
            if small_units is not None:
                from .matching import with_units

                to_final, main_channels, confidence_by_unit, curated_ids, num_units = with_new_units(
                    small_units, to_final, main_channels, confidence_by_unit, curated_ids, num_units)
                # every spike's template, for the residual that the curated units' search subtracts
                matching_templates = with_units(matching_templates, small_units, noise_levels, params)
        if params["match_small_templates"]:
            from .discover import match_small_templates

            timer.start("matching")  # a matching pass, whichever stage ran before it
            spikes, _ = match_small_templates(preprocessed, matching_templates, spikes, noise_levels, params, job_kwargs,
                                              censor, protected=np.flatnonzero(to_final < num_curated), log=log)
        if params["refit_unfitted_spikes"]:
            from .matching import drop_unfitted_spikes

            timer.start("matching")
            spikes, _ = drop_unfitted_spikes(preprocessed, matching_templates, spikes,
                                             protected=np.flatnonzero(to_final < num_curated), log=log)
        if params["drop_copied_spikes"]:
            from .matching import drop_copied_spikes

            timer.start("matching")
            # before the join: once two pieces of one neuron are joined, a copy between them is one unit's
            # double spike, which this test (between units) no longer sees
            spikes, _ = drop_copied_spikes(preprocessed, matching_templates, spikes, noise_levels, params,
                                           protected=np.flatnonzero(to_final < num_curated), log=log)
        join_args = (preprocessed, recording, motion, channel_locations, main_channels, to_final, num_units,
                     noise_levels, params, job_kwargs, np.flatnonzero(to_final < num_curated), log)
        if params["duplicate_min_similarity"] < 1.0:
            labels = join_duplicates(spikes, labels, *join_args)
        if params["reassign_alike_units"]:
            from .matching import reassign_between_alike_units

            timer.start("matching")
            # between joins: two pieces of one neuron would be sorted by amplitude into a big and a small unit,
            # so pieces are joined first, and the pieces that this sorting makes alike are joined after
            spikes, num_moved = reassign_between_alike_units(preprocessed, matching_templates, spikes, noise_levels,
                                                             censor, protected=np.flatnonzero(to_final < num_curated),
                                                             log=log)
            if num_moved and params["duplicate_min_similarity"] < 1.0:
                labels = join_duplicates(spikes, labels, *join_args)
            from .matching import FINAL_REASSIGN_MAX_TRAVEL_UM, FINAL_REASSIGN_MIN_SIMILARITY, REASSIGN_MAX_SIZE_RATIO

            travel = motion_span_um(motion)
            if travel <= FINAL_REASSIGN_MAX_TRAVEL_UM:
                # the joined units' own templates, on every channel: a joined unit's matching template is one piece's
                final_templates = unit_templates(preprocessed, spikes, spikes["unit_index"], len(to_final),
                                                 noise_levels, params, job_kwargs, sparse=False)
                spikes, _ = reassign_between_alike_units(preprocessed, final_templates, spikes, noise_levels, censor,
                                                         protected=np.flatnonzero(to_final < num_curated), log=log,
                                                         min_similarity=FINAL_REASSIGN_MIN_SIMILARITY,
                                                         max_size_ratio=REASSIGN_MAX_SIZE_RATIO)
            else:
                log(f"joined units: no second reassignment, the probe moved {travel:.1f} um (one template per unit "
                    f"holds where it moved at most {FINAL_REASSIGN_MAX_TRAVEL_UM:g} um)")
        if num_curated:
            from .curated import find_missed_spikes
            from .matching import join_templates, residual_of_matching

            residual = residual_of_matching(preprocessed, matching_templates, spikes)
            all_templates = matching_templates
            if labelled_only.size:
                only_labels = np.full(peaks.size, -1, dtype="int64")
                for j, k in enumerate(labelled_only):
                    only_labels[peak_units == k] = num_found + j
                all_templates = join_templates(matching_templates, unit_templates(
                    preprocessed, peaks, only_labels, len(to_final), noise_levels, params, job_kwargs))
            missed, missed_report = find_missed_spikes(residual, all_templates, spikes,
                                                       np.flatnonzero(to_final < num_curated), censor)
            spikes = np.concatenate([spikes, missed])
            merge_report["curated"]["missed_spikes"] = {int(to_final[u]): r for u, r in missed_report.items()}
            log(f"curated units: {missed.size} spikes matching missed found on the residual "
                f"({merge_report['curated']['missed_spikes']})")
        spikes["unit_index"] = to_final[spikes["unit_index"]]
        if params["split_by_amplitude"]:
            from .matching import split_by_amplitude

            samples, total_samples = global_sample_index(spikes, recording)
            spikes, parents = split_by_amplitude(spikes, samples, total_samples, sampling_frequency, num_units,
                                                 params["min_cluster_size"], seed,
                                                 protected=np.arange(num_curated), log=log)
            main_channels, confidence_by_unit, curated_ids, num_units = with_split_units(
                parents, main_channels, confidence_by_unit, curated_ids, num_units)
        if params["split_peeled_units"]:
            from .peeled_split import split_peeled_units

            samples, total_samples = global_sample_index(spikes, recording)
            spikes, parents = split_peeled_units(preprocessed, spikes, num_units, table, noise_levels, params,
                                                 job_kwargs, samples, total_samples,
                                                 protected=np.arange(num_curated), log=log)
            main_channels, confidence_by_unit, curated_ids, num_units = with_split_units(
                parents, main_channels, confidence_by_unit, curated_ids, num_units)
        if params["drop_copied_spikes"]:
            spikes = drop_copies_between_sorted_units(preprocessed, spikes, num_units, noise_levels, params,
                                                      job_kwargs, protected=np.arange(num_curated), log=log)
    else:
        spikes = spikes_from_labels(peaks, labels)
    if num_curated:
        spikes = keep_labelled_spikes(spikes, label_data, censor)
    spikes, kept_units = drop_rare_units(spikes, recording.get_total_duration(),
                                         params["min_firing_rate"], protected=np.arange(num_curated))
    renumber = np.full(num_units + 1, -1, dtype="int64")  # the last entry maps -1 to -1
    renumber[kept_units] = np.arange(kept_units.size)
    labels = renumber[labels]  # peaks of dropped units count as discarded, like the sorting says
    num_units = kept_units.size
    if num_units == 0:
        timer.finish()
        return empty_result(recording, sorter_output_folder, "no unit kept a spike after template matching.", log)
    main_channel_ids = recording.channel_ids[main_channels[kept_units]]
    log(f"{num_units} units, {spikes.size} spikes")

    timer.start("save")
    sorting = build_sorting(spikes, sampling_frequency, num_units, recording.get_num_segments())
    save_outputs(sorter_output_folder, params, peaks, labels, confidence, encoder, losses,
                 merge_report, noise_levels, embed_rate, channel_locations, table, sampling_frequency, log)
    np.save(sorter_output_folder / "spikes.npy", spikes)
    write_sorting(sorting, sorter_output_folder, main_channel_ids, confidence_by_unit[kept_units],
                  list(curated_ids[kept_units]))
    timings = timer.finish()
    (sorter_output_folder / "timings.json").write_text(json.dumps(timings, indent=2))
    del preprocessed
    if cache_info is not None and cache_info.get("mode") == "folder":
        shutil.rmtree(sorter_output_folder / "preprocessed", ignore_errors=True)
    return sorting


def augmented_positives(encoder, snippets, peaks, table, channel_locations, nbefore, noise_snippets, scaling,
                        cluster_index, sub_labels, sub_probs, params, sampling_frequency, device, rng):
    """Augmented views (collisions, noise, jitter) of confident cluster members, with their cluster label."""
    import torch

    from .augment import AugmentConfig, augment
    from .train import embed

    confident = np.flatnonzero((sub_labels >= 0) & (sub_probs >= 0.5))
    if confident.size == 0:
        return np.zeros((0, scaling.mean.size + 2), "float32"), np.zeros(0, "float32"), np.zeros(0, "int64")
    chosen = np.sort(rng.choice(confident, min(confident.size, NUM_AUGMENTED_POSITIVES), replace=False))
    spike_index = cluster_index[chosen]
    generator = torch.Generator(device=device)
    generator.manual_seed(params["seed"] + 1)
    spikes = torch.as_tensor(snippets[spike_index], device=device)
    bank = torch.as_tensor(snippets[rng.choice(snippets.shape[0], min(snippets.shape[0], 5000), replace=False)],
                           device=device)
    noise = torch.as_tensor(noise_snippets, device=device)
    views = augment(spikes, noise, bank, AugmentConfig.from_params(params, sampling_frequency), generator)
    views = views.cpu().numpy()
    locations = estimate_locations(views, table, peaks[spike_index], channel_locations, nbefore)
    feats = scaling.transform(embed(encoder, views, device), locations)
    return feats, peak_amplitude(views, nbefore, params["peak_sign"]), sub_labels[chosen]


def peak_amplitude(snippets, nbefore, peak_sign, half_window=3):
    """Signed peak of the main channel near the snippet centre, as the detector reports it."""
    window = snippets[:, 0, max(0, nbefore - half_window): nbefore + half_window + 1]
    if peak_sign == "neg":
        return window.min(axis=1).astype("float32")
    if peak_sign == "pos":
        return window.max(axis=1).astype("float32")
    return window[np.arange(window.shape[0]), np.abs(window).argmax(axis=1)].astype("float32")


def save_outputs(folder: Path, params, peaks, labels, confidence, encoder, losses, merge_report,
                 noise_levels, embed_rate, channel_locations, table, sampling_frequency, log):
    import torch

    np.save(folder / "peaks.npy", peaks)
    np.save(folder / "spike_labels.npy", labels)
    np.save(folder / "confidence.npy", confidence)
    np.save(folder / "noise_levels.npy", noise_levels)
    metadata = dict(
        accm_version=__version__,
        torch_version=torch.__version__,
        num_channels=int(encoder.num_channels),
        num_samples=int(encoder.num_samples),
        embedding_dim=int(encoder.embedding_dim),
        channel_locations=np.asarray(channel_locations).tolist(),
        channel_table=np.asarray(table).tolist(),
        params={k: v for k, v in params.items() if k != "job_kwargs"},
        loss_curve=[float(x) for x in losses],
        inference_spikes_per_s=float(embed_rate),
        sampling_frequency=float(sampling_frequency),
    )
    save_encoder(folder, encoder, metadata)
    (folder / "merges.json").write_text(json.dumps(merge_report, indent=1))
    log(f"outputs written to {folder}")
