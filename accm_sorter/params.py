"""The one place where every accm parameter is defined.

Each parameter has a name, a default, a type, an allowed range or set of choices, the pipeline
stage that reads it and a description. The sorter's ``_default_params`` and
``_params_description``, the validation of user input and ``docs/parameters.md`` are all
generated from ``PARAMETERS`` below, so they cannot disagree.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    kind: type | tuple
    """Accepted Python type(s). ``float`` also accepts ints; ``None`` allowed if ``nullable``."""
    stage: str
    description: str
    low: float | None = None
    """Inclusive lower bound for numbers."""
    high: float | None = None
    """Inclusive upper bound for numbers."""
    choices: tuple = ()
    nullable: bool = False

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"[{low}, {high}]"
        return "any"

    def type_name(self) -> str:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        names = [k.__name__ for k in kinds]
        if self.nullable:
            names.append("None")
        return " | ".join(names)

    def check(self, value: Any) -> Any:
        """Return the validated value or raise TypeError/ValueError saying what to change."""
        if value is None:
            if self.nullable:
                return None
            raise TypeError(f"accm parameter '{self.name}' cannot be None; use a {self.type_name()}, e.g. {self.default!r}.")
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        ok = False
        for kind in kinds:
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
                ok = True
                break
            if kind is int and isinstance(value, bool):
                continue
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
                ok = True
                break
            if isinstance(value, kind):
                ok = True
                break
        if not ok:
            raise TypeError(
                f"accm parameter '{self.name}' must be {self.type_name()}, got {type(value).__name__} ({value!r}). "
                f"Default is {self.default!r}."
            )
        if self.choices and value not in self.choices:
            raise ValueError(
                f"accm parameter '{self.name}'={value!r} is not allowed; use {self.describe_range()}."
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                raise ValueError(f"accm parameter '{self.name}' is NaN; use a number in {self.describe_range()}.")
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise ValueError(
                    f"accm parameter '{self.name}'={value!r} is out of range; use a value in {self.describe_range()}."
                )
        return value


STAGES = (
    "general",
    "preprocess",
    "detect",
    "snippets",
    "augment",
    "train",
    "cluster",
    "pairwise",
    "matching",
)

PARAMETERS: tuple[Parameter, ...] = (
    # --- general -------------------------------------------------------------------------
    Parameter("device", "auto", str, "general",
              "Torch device for training and inference: 'auto' uses CUDA when available, else CPU. On CUDA, "
              "inference runs in float16 (autocast), training in float32; GPU results may differ from CPU "
              "results in the last digits and are not guaranteed identical between runs.",
              choices=("auto", "cpu", "cuda")),
    Parameter("seed", 0, int, "general",
              "Seed for every random choice (spike subsampling, augmentations, network initialisation). "
              "The same seed and input give the same spike trains on CPU.", low=0, high=2**32 - 1),
    Parameter("job_kwargs", {}, dict, "general",
              "SpikeInterface job kwargs for the chunked stages (n_jobs, chunk_duration, pool_engine, ...). By default "
              "they run in-process (n_jobs=1: lowest memory, fastest on a laptop) and torch uses every core; an "
              "explicit n_jobs also sets torch's thread count. n_jobs > 1 pays off on long many-channel recordings."),
    Parameter("save_embeddings", True, bool, "general",
              "Save per-spike embeddings (float16) and confidences in sorter_output/."),
    Parameter("split_by_group", True, bool, "general",
              "When the channel property 'group' has several values (shanks of a multi-shank probe, tetrodes), "
              "sort each group on its own in sorter_output/group_<g>/ and aggregate the units into one sorting "
              "with a unit property 'group'. False sorts all channels together."),
    # --- preprocess ----------------------------------------------------------------------
    Parameter("apply_preprocessing", True, bool, "preprocess",
              "Band-pass, common reference and whiten the recording. Set False if it is already preprocessed "
              "(it is then only z-scored so that thresholds are in noise units)."),
    Parameter("freq_min", 300.0, float, "preprocess", "High-pass corner of the band-pass filter (Hz).",
              low=1.0, high=10000.0),
    Parameter("freq_max", 6000.0, float, "preprocess",
              "Low-pass corner of the band-pass filter (Hz); clipped to 0.45 x sampling rate.", low=100.0, high=50000.0),
    Parameter("common_reference", "auto", str, "preprocess",
              "Global median reference: 'auto' applies it with 8 or more channels (on fewer channels it would "
              "subtract the spikes themselves).", choices=("auto", "median", "none")),
    Parameter("whiten", True, bool, "preprocess", "Local whitening (radius 100 um) after filtering."),
    Parameter("motion_correction", "auto", str, "preprocess",
              "Estimate probe motion with spikeinterface's correct_motion and interpolate the traces to undo it. "
              "'auto' turns it on for probes at least motion_min_extent_um deep with 16 or more channels (on a "
              "tetrode there is no depth axis to estimate motion along).", choices=("auto", "on", "off")),
    Parameter("motion_preset", "dredge_fast", str, "preprocess", "correct_motion preset used for the estimation.",
              choices=("dredge_fast", "dredge", "rigid_fast", "nonrigid_fast_and_accurate", "kilosort_like")),
    Parameter("motion_min_extent_um", 200.0, float, "preprocess",
              "Smallest probe depth extent for which motion_correction='auto' turns motion correction on.",
              low=0.0, high=100000.0),
    Parameter("cache_preprocessing", "auto", str, "preprocess",
              "Where to keep the preprocessed traces: 'memory', 'folder' (sorter_output/, memory-mapped), "
              "'none' (recompute on each pass) or 'auto' (memory up to 2 GiB of traces, else folder).",
              choices=("auto", "memory", "folder", "none")),
    # --- detect --------------------------------------------------------------------------
    Parameter("peak_sign", "neg", str, "detect", "Sign of the spike peaks to detect.",
              choices=("neg", "pos", "both")),
    Parameter("detect_method", "locally_exclusive", str, "detect",
              "'locally_exclusive': threshold each sample of each channel. 'matched_filtering': threshold the "
              "traces filtered by the recording's typical spike waveform and pooled over nearby channels (finds "
              "more small spikes, but on crowded sites also collision and noise peaks that become false units: "
              "see docs/method.md; peak_sign 'both' falls back to the plain threshold).",
              choices=("matched_filtering", "locally_exclusive")),
    Parameter("detect_threshold", 5.0, float, "detect",
              "Detection threshold in multiples of the noise level (MAD) of each channel, or of the "
              "matched filter's output.", low=1.0, high=100.0),
    Parameter("detect_radius_um", 50.0, float, "detect",
              "A peak is kept only if it is the largest within this radius and the exclusion window.",
              low=0.0, high=10000.0),
    Parameter("exclude_sweep_ms", 0.2, float, "detect",
              "Half-width of the time window in which only the largest peak (within the radius) is kept.",
              low=0.0, high=5.0),
    # --- snippets ------------------------------------------------------------------------
    Parameter("ms_before", 0.6, float, "snippets", "Snippet length before the peak (ms).", low=0.1, high=5.0),
    Parameter("ms_after", 1.2, float, "snippets", "Snippet length after the peak (ms).", low=0.1, high=10.0),
    Parameter("num_local_channels", 8, int, "snippets",
              "Channels per snippet: the main channel and its nearest neighbours (capped by the channel count).",
              low=1, high=64),
    # --- augment -------------------------------------------------------------------------
    Parameter("aug_jitter_samples", 1.5, float, "augment",
              "Largest sub-sample time shift (samples) applied to a view.", low=0.0, high=10.0),
    Parameter("aug_time_warp", 0.05, float, "augment",
              "Largest relative stretch/compression of the time axis.", low=0.0, high=0.5),
    Parameter("aug_amplitude_scale", 0.15, float, "augment",
              "Amplitude is multiplied by a factor drawn in [1 - x, 1 + x].", low=0.0, high=0.9),
    Parameter("aug_noise_scale", 1.0, float, "augment",
              "Scale of the real noise snippets (cut from spike-free stretches) added to a view.", low=0.0, high=5.0),
    Parameter("aug_overlap_prob", 0.4, float, "augment",
              "Probability of adding another spike, scaled and shifted, to a view (collision simulation).",
              low=0.0, high=1.0),
    Parameter("aug_overlap_max_lag_ms", 1.0, float, "augment",
              "Largest time lag of the added spike in the overlap augmentation (ms).", low=0.0, high=5.0),
    Parameter("aug_channel_dropout", 0.1, float, "augment",
              "Probability that each non-main channel of a view is zeroed (spatial jitter).", low=0.0, high=0.9),
    Parameter("aug_spatial_jitter_ratio", 0.7, float, "augment",
              "A view may be re-centred on one of the nearest channels whose peak is at least this fraction of "
              "the main channel's, so the embedding does not depend on which contact happened to peak. "
              "1.0 turns the spatial jitter off.", low=0.0, high=1.0),
    # --- train ---------------------------------------------------------------------------
    Parameter("embedding_dim", 10, int, "train", "Size of the encoder output used for clustering.", low=2, high=256),
    Parameter("projection_dim", 32, int, "train", "Size of the projection head output used by the loss.",
              low=2, high=512),
    Parameter("temperature", 0.2, float, "train", "NT-Xent temperature: lower values sharpen the contrast between positives and negatives (CEED uses 0.2).", low=0.01, high=10.0),
    Parameter("train_max_spikes", 20000, int, "train",
              "Largest number of spikes (uniformly subsampled per channel) used to train the encoder.",
              low=100, high=10_000_000),
    Parameter("train_steps", 300, int, "train", "Optimiser steps of contrastive training.", low=1, high=1_000_000),
    Parameter("batch_size", 256, int, "train", "Spikes per contrastive batch (2 views each).", low=8, high=65536),
    Parameter("learning_rate", 2e-3, float, "train", "AdamW learning rate (cosine decay).", low=1e-6, high=1.0),
    Parameter("pretrained_encoder", None, str, "train",
              "Start from a previous run's encoder: the path of its encoder.pt, its sorter_output/ or its run "
              "folder. The snippet shape must match (same num_local_channels, ms_before, ms_after, sampling "
              "rate). Loaded weights-only: files carrying pickled code are refused.", nullable=True),
    Parameter("pretrained_train_steps", 60, int, "train",
              "Contrastive fine-tuning steps on this recording when starting from pretrained_encoder "
              "(0 uses it as it is).", low=0, high=1_000_000),
    Parameter("labels", None, str, "train",
              "Curated labels: the path of a partial sorting of this recording (SpikeInterface sorting folder, or "
              "a phy folder; noise clusters are ignored). The self-supervised stages run as without them; then the "
              "units holding a curated unit's labelled spikes become that unit, a curated unit nobody found is "
              "built from its spikes, and after matching a matched filter finds its missed spikes at a 5% "
              "false-discovery rate. Curated units keep every labelled spike.", nullable=True),
    Parameter("labels_weight", 0.0, float, "train",
              "Weight of a supervised contrastive term on the labelled spikes, added to NT-Xent when training the "
              "encoder. 0 (default) keeps the encoder self-supervised, so unlabelled units come out as they would "
              "without labels; > 0 moves the encoder and with it every unit (measured on low-snr, weight 1: "
              "unlabelled units 0.838 -> 0.819 mean accuracy).", low=0.0, high=100.0),
    Parameter("min_spikes", 50, int, "train",
              "Fewest detected spikes needed to train; fewer gives an empty sorting with a warning.",
              low=2, high=1_000_000),
    # --- cluster -------------------------------------------------------------------------
    Parameter("cluster_max_spikes", 40000, int, "cluster",
              "Largest number of spikes clustered by HDBSCAN; the others are assigned by the pairwise classifier.",
              low=100, high=10_000_000),
    Parameter("min_cluster_size", 20, int, "cluster", "HDBSCAN min_cluster_size (on the clustered subsample).",
              low=2, high=100000),
    Parameter("location_scale_um", 10.0, float, "cluster",
              "Spike locations are divided by this before being appended to the (unit-norm) embedding: smaller "
              "values weigh position more.", low=0.1, high=10000.0),
    # --- pairwise ------------------------------------------------------------------------
    Parameter("merge_threshold", 0.5, float, "pairwise",
              "Two clusters are merged when the pairwise classifier's mean same-neuron probability across them "
              "exceeds this (and the template and refractory guards agree).", low=0.0, high=1.0),
    Parameter("assign_threshold", 0.3, float, "pairwise",
              "A spike is assigned to its best cluster only if the same-neuron probability exceeds this; "
              "otherwise it is discarded as noise.", low=0.0, high=1.0),
    Parameter("resolve_overlaps", True, bool, "pairwise",
              "Peel each overlapping neighbour's template from a spike's snippet and let the pairwise classifier "
              "re-assign the residual."),
    Parameter("overlap_max_lag_ms", 1.0, float, "pairwise",
              "Two spikes overlap when their peaks are this close in time (ms) and their main channels within "
              "overlap_radius_um.", low=0.0, high=5.0),
    Parameter("overlap_radius_um", 100.0, float, "pairwise",
              "Largest distance between the main channels of two overlapping spikes that are peeled.",
              low=0.0, high=10000.0),
    Parameter("masked_spike_threshold", 0.95, float, "pairwise",
              "Spikes found on the residual (after subtracting every assigned spike's template) are kept only when "
              "the pairwise classifier's same-neuron probability reaches this: residuals are noisier than the "
              "first pass (measured on probe32: 93% of those kept at 0.95 are real, 59% at 0.3). "
              "1.0 turns masked-spike recovery off.", low=0.0, high=1.0),
    Parameter("min_firing_rate", 0.05, float, "pairwise",
              "Units firing less than this (Hz) after assignment are removed.", low=0.0, high=1000.0),
    Parameter("split_max_similarity", 0.9, float, "pairwise",
              "A unit is split in two (or more) when PCA + HDBSCAN of its own waveforms finds parts whose mean "
              "waveforms have a cosine similarity below this; 0 turns splitting off.", low=0.0, high=1.0),
    Parameter("split_max_depth", 3, int, "pairwise",
              "How many times the parts of a split unit are themselves tried for a split (1 = only the units "
              "as clustered). A crowded site can hide three or four neurons in one cluster, and one PCA "
              "of the mixture separates only the most different one.", low=1, high=10),
    Parameter("split_waveforms", "snippets", str, "pairwise",
              "What a unit's split looks at: 'snippets' (each spike's own snippet, on the channels of the "
              "unit's main channel; spikes whose snippet lacks one of them are left out) or 'unit_channels' "
              "(every spike cut again from the traces on the unit's channels). 'unit_channels' separates two "
              "neurons peaking on different channels that 'snippets' sees as one, and is the one to use with "
              "detect_method='matched_filtering' (low-snr 17 -> 20/25); with the plain threshold it lost "
              "units on low-snr (see docs/method.md).", choices=("snippets", "unit_channels")),
    Parameter("split_clusterer", "hdbscan", str, "pairwise",
              "How a unit's own waveforms are cut into parts: 'hdbscan' (density) or 'isosplit' "
              "(SpikeInterface's: k-means parts joined again wherever their 1-D projection shows no dip; it "
              "separates touching clouds HDBSCAN keeps whole, but cuts more collision parts out, and its numba "
              "code compiles for about 20 s on first use in each process).", choices=("hdbscan", "isosplit")),
    Parameter("duplicate_min_similarity", 0.97, float, "pairwise",
              "Two units are joined when their mean waveforms have a cosine similarity of at least this (peak "
              "amplitudes within 20 %, no refractory-period collisions between them): once after splitting, "
              "and once on the template-matched spikes; 1 turns both off.", low=0.0, high=1.0),
    Parameter("join_drift_splits", True, bool, "pairwise",
              "Also join two units that take turns firing (their firing-rate profiles over time overlap by at "
              "most 0.35) when their mean waveforms have cosine >= 0.75 and peak amplitudes within 40 %: one "
              "neuron that motion correction did not fully bring back, seen at two places (drift, seed 2002: "
              "four neurons cut 80/20 this way). Where motion was estimated, also join units with cosine >= 0.5 "
              "that fire at different probe positions (their profiles over the estimated displacement at each "
              "spike overlap by at most 0.35): a neuron that motion interpolation smears at some positions "
              "(drift, seed 2003: one neuron cut in three pieces 0.56-0.73 alike). Applies wherever duplicate "
              "units are joined."),
    # --- matching ------------------------------------------------------------------------
    Parameter("matching_method", "tdc-peeler", str, "matching",
              "Final pass that finds every spike of accm's units in the whole recording with SpikeInterface's "
              "template matching, driven by accm's templates ('tdc-peeler', 'circus-omp' or 'wobble'): it "
              "recovers spikes that detection missed or that overlap. 'none' keeps the detected, classified spikes. "
              "tdc-peeler is the most accurate here (low-snr, seed 2002: 20/25 well detected, mean accuracy 0.842; "
              "wobble 16/25, 0.701).",
              choices=("tdc-peeler", "circus-omp", "wobble", "none")),
    Parameter("matching_threshold", 4.0, float, "matching",
              "tdc-peeler's detection threshold (noise levels): the engine tries templates only where its own "
              "detector (plain and matched-filter) sees a peak above this. Lower finds more spikes of small "
              "units (the units discover_units finds need 4; 0.1 used 5); other engines ignore it.",
              low=1.0, high=100.0),
    Parameter("template_rescaling_passes", 1, int, "matching",
              "After matching (and discovery), scale each unit's template to the median amplitude matching fitted "
              "to its spikes, where that is more than 10 % off, and match again; this many times. Templates of small "
              "units estimated from detected spikes alone are too big (detection keeps the noise-enlarged ones), "
              "and matching drops spikes fitted below 0.7 of the template. 0 matches once. Each pass costs one "
              "matching pass.", low=0, high=10),
    Parameter("split_matched_units", True, bool, "matching",
              "After matching (and discovery), split each unit once more on its matched spikes (up to 4000 of "
              "them, PCA of their waveforms on the unit's local channels, isosplit), and match again when one "
              "splits. Before matching a small neuron beside a big one is a tenth of their joint cluster and no "
              "part of its own; matching finds both in full. A split is kept when its parts differ (cosine under "
              "split_max_similarity), each looks like the unit (cosine >= 0.8), every two fire together over the "
              "recording (rate-profile overlap >= 0.5, 80 spikes a part at least) and their trains are not "
              "refractory towards each other. Used only when matching_method is not 'none'."),
    Parameter("hidden_spike_passes", 1, int, "matching",
              "After the last matching pass, subtract every matched spike and match the same templates on what is "
              "left, this many times: a spike fired within a fraction of a millisecond of a bigger one on the same "
              "channels is taken into the bigger one's fit and never looked for. A spike found within the censor "
              "window of its unit's own is dropped. 0 switches it off. Each pass costs one matching pass.",
              low=0, high=5),
    Parameter("discover_units", True, bool, "matching",
              "After matching, subtract every matched spike and look for units on what is left: matched-filter "
              "detection on the residual, clustered by SpikeInterface's iterative isosplit; the new units' "
              "templates join a second matching pass, and a new unit that only takes a known unit's spikes is "
              "dropped. Finds small neurons that the threshold crossed too rarely to cluster (low-snr seed 2003: "
              "15 -> 19/25 well detected, mean accuracy 0.591 -> 0.763; docs/method.md). Costs about 30 s, most "
              "of it compiling isosplit. Used only when matching_method is not 'none'."),
    Parameter("discover_small_units", True, bool, "matching",
              "Also keep the units too small for the matching engine's detector: the residual peaks that no "
              "discovered unit took are clustered again (templates down to 2.5 noise levels), and each cluster "
              "keeps its peaks as spikes, less those sitting on another unit's spikes far more often than chance "
              "(remnants of that unit's subtraction). Dense-overlap seed 2002: mean accuracy 0.735 -> 0.839 "
              "(docs/method.md, 9h). Costs one more clustering of the residual. Needs discover_units."),
    Parameter("match_small_templates", True, bool, "matching",
              "After the last matching pass, subtract every spike found and match the templates that peak below "
              "5 noise levels once more, alone, on what is left, with SpikeInterface's wobble (lupin's engine, which "
              "scores the fit of the whole template). The small units of discover_small_units hold only the "
              "residual peaks the matched filter found and gain the rest of their spikes here. A spike within the "
              "censor window of its unit's own, or copying another unit's spikes (a remnant of a subtraction), is "
              "dropped. Each template keeps fits of at least 0.7 times itself and 4 spreads of its correlation with "
              "the residual where the residual still holds its spikes (wobble's own threshold elsewhere). "
              "Dense-overlap seed 2002: mean accuracy 0.839 -> 0.875, a neuron spread thin over many channels "
              "0.00 -> 0.81; seed 2003 0.941 -> 0.968 (docs/method.md, 9i). Used only when matching_method is not "
              "'none'."),
    Parameter("refit_unfitted_spikes", True, bool, "matching",
              "After the small-template pass, refit every spike kept at its template's scale without a fit (the "
              "small units' residual peaks, the small templates' wobble matches) on the residual of matching, "
              "together with the templates (and their time derivatives) of the spikes overlapping it, once on its "
              "own channels and once on those and its neighbours', and drop it where either fit gives it under 0.5 "
              "of its template: a remnant of a neighbour's subtraction or a noise peak (docs/method.md, 9l). Used "
              "only when matching_method is not 'none'."),
    Parameter("split_by_amplitude", True, bool, "matching",
              "At the end, a unit whose spikes' fitted amplitudes form two modes (a two-component Gaussian mixture "
              "with means at least 3 pooled standard deviations apart, the smaller holding at least 10 %) is split "
              "between them, where the two parts fire together over the recording and meet in the refractory period "
              "as two neurons do: two neurons of one shape at two sizes, which matching's free amplitude fits with one "
              "template (docs/method.md, 9o). Used only when matching_method is not 'none'."),
    Parameter("split_peeled_units", True, bool, "matching",
              "At the end, each unit's spikes are looked at with every other matched spike subtracted (its peeled "
              "waveforms); k-means cuts them in two, and the cut is kept where the parts fire together over the "
              "recording, each looks like the unit, and they meet in the refractory period as two neurons do (the kept "
              "parts then refined by a two-Gaussian mixture with one shared covariance fitted to them, and the "
              "trains asked again): two "
              "faint neurons side by side in a crowded site, whose raw waveforms differ less than their neighbours' "
              "collisions make them vary (docs/method.md, 9p). Used only when matching_method is not 'none'."),
    Parameter("reassign_alike_units", True, bool, "matching",
              "After the last matching pass, each spike of units whose templates look alike (cosine >= 0.7) is "
              "taken alone (the residual with its own fit added back) and given to the unit among them whose "
              "template at amplitude 1 fits it with the least squared error (lags up to 3 samples, each unit's "
              "share of the spikes as prior), in two rounds that re-estimate the templates. Matching's free "
              "amplitude lets a big neuron's template, scaled down, take a smaller alike neuron's spikes "
              "(tetrode 7/10 -> 9/10 well detected, dense-overlap seed 2002 19/25 -> 21/25; docs/method.md, 9k). "
              "The duplicate join runs before it and again after it; then, once more on the joined units, among "
              "units down to cosine 0.5 whose templates are at most twice each other's size, where the estimated "
              "motion spans at most 5 um (docs/method.md, 9k). "
              "Used only when matching_method is not 'none'."),
    Parameter("drop_copied_spikes", True, bool, "matching",
              "After the last matching pass, where two units sharing channels fire within 0.1 ms of each other at "
              "least 20 times and 4 times as often as chance, each such pair of spikes is one spike matched twice (a "
              "remnant of one neuron's subtraction fitted by a neighbour's template): the spike whose template "
              "explains less of the recording there is dropped (dense-overlap seed 2003 23/25 -> 24/25 well detected; "
              "docs/method.md, 9j). The test runs again between the sorted units once pieces are joined "
              "(dense-overlap 2002 20/25 -> 21/25). Used only when matching_method is not 'none'."),
    Parameter("discover_min_snr", 3.0, float, "matching",
              "A unit found on the residual is kept when its template's peak-to-peak reaches this many noise "
              "levels on its best channel.", low=0.0, high=100.0),
    Parameter("template_sparsity_threshold", 1.5, float, "matching",
              "Channels whose template peak-to-peak is below this many noise levels are left out of the "
              "matching templates.", low=0.0, high=100.0),
)

PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def default_params() -> dict:
    return {p.name: (dict(p.default) if isinstance(p.default, dict) else p.default) for p in PARAMETERS}


def params_description() -> dict:
    return {
        p.name: f"{p.description} [{p.type_name()}, {p.describe_range()}, stage: {p.stage}]" for p in PARAMETERS
    }


def validate_params(user_params: dict) -> dict:
    """Fill defaults and check every parameter; raise ValueError/TypeError with the fix."""
    unknown = [k for k in user_params if k not in PARAMETERS_BY_NAME]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, PARAMETERS_BY_NAME.keys(), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(
            f"Unknown accm parameter(s): {', '.join(hints)}. "
            f"See accm_sorter.params.PARAMETERS or get_default_sorter_params('accm') for the valid names."
        )
    params = default_params()
    for key, value in user_params.items():
        params[key] = PARAMETERS_BY_NAME[key].check(value)
    if params["freq_min"] >= params["freq_max"]:
        raise ValueError(
            f"accm parameter freq_min={params['freq_min']} must be below freq_max={params['freq_max']}."
        )
    return params



def parameters_markdown() -> str:
    """The parameter reference page (docs/parameters.md), generated from PARAMETERS."""
    lines = [
        "# Parameter reference",
        "",
        "Generated from `accm_sorter/params.py` by `accm-sorter params --markdown`; do not edit by hand.",
        "Pass any of these to `run_sorter(\"accm\", recording, **params)` or `accm-sorter sort --param NAME=VALUE`.",
        "",
    ]
    for stage in STAGES:
        lines += [f"## {stage}", "", "| name | default | type | range | description |", "|---|---|---|---|---|"]
        for p in PARAMETERS:
            if p.stage == stage:
                lines.append(
                    f"| `{p.name}` | `{p.default!r}` | {p.type_name()} | {p.describe_range()} | {p.description} |"
                )
        lines.append("")
    return "\n".join(lines)
