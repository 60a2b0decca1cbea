"""Each pipeline stage on its own, on small arrays."""

import numpy as np
import pytest
import torch

from accm_sorter.augment import AugmentConfig, augment, recentre, resample_time
from accm_sorter.curation import remove_duplicate_spikes, remove_rare_units
from accm_sorter.model import PairwiseClassifier, SpikeEncoder
from accm_sorter.pairwise import refractory_ratio, template_similarity
from accm_sorter.params import PARAMETERS, default_params, parameters_markdown, validate_params
from accm_sorter.snippets import local_channel_table, recentre_table
from accm_sorter.train import nt_xent_loss


def test_local_channel_table_starts_with_main_channel_and_is_sorted_by_distance():
    locations = np.array([[0, y] for y in range(0, 200, 20)] + [[20, y] for y in range(0, 200, 20)], float)
    table = local_channel_table(locations, 6)
    assert table.shape == (20, 6)
    assert (table[:, 0] == np.arange(20)).all()
    dist = np.linalg.norm(locations[table] - locations[:, None], axis=2)
    assert (np.diff(dist, axis=1) >= -1e-9).all()
    wide = local_channel_table(locations, 12)
    assert (wide[:, :6] == table).all()  # the wide table extends the local one
    remap = recentre_table(wide, table, 3)
    # re-centring on the main channel itself is the identity
    assert (remap[:, 0] == np.arange(6)).all()


def test_recentre_moves_the_peak_channel():
    wide = torch.zeros(1, 4, 10)
    wide[0, 1, 5] = -10.0  # the spike is biggest on neighbour at wide position 1
    remap = torch.tensor([[[0, 1, 2], [1, 0, 3]]])  # centre 0 or centre 1
    eligible = torch.tensor([[False, True]])
    view = recentre(wide, remap, eligible, torch.Generator().manual_seed(0))
    assert view.shape == (1, 3, 10)
    assert view[0, 0, 5] == -10.0  # now the first (main) channel holds the peak


def test_augment_shapes_and_positive_pairs_stay_close():
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(-3, 3, 40)
    spikes = torch.stack([-torch.exp(-t**2)[None].repeat(4, 1) * (i + 1) for i in range(8)])
    noise = torch.randn(16, 4, 40, generator=gen) * 0.05
    config = AugmentConfig(1.0, 0.05, 0.1, 1.0, 0.5, 5, 0.1)
    view = augment(spikes, noise, spikes, config, gen)
    assert view.shape == spikes.shape
    assert torch.isfinite(view).all()
    # a view is closer to its own spike than to a different-amplitude one
    d_own = (view - spikes).flatten(1).norm(dim=1)
    d_other = (view - spikes.roll(1, 0)).flatten(1).norm(dim=1)
    assert (d_own < d_other).float().mean() >= 0.75


def test_resample_identity():
    x = torch.randn(2, 3, 20)
    same = resample_time(x, torch.zeros(2), torch.ones(2))
    assert torch.allclose(same, x, atol=1e-6)


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(32, 8)
    matched = nt_xent_loss(z, z + 0.01 * torch.randn_like(z), 0.2)
    shuffled = nt_xent_loss(z, z[torch.randperm(32)], 0.2)
    assert matched + 2.0 < shuffled  # ln(63) ~ 4.1 is chance level for 32 pairs


def test_encoder_output_shape():
    enc = SpikeEncoder(8, 54, 10)
    assert enc(torch.randn(5, 8, 54)).shape == (5, 10)


def test_pairwise_classifier_is_symmetric():
    torch.manual_seed(0)
    clf = PairwiseClassifier(6, 2)
    a, b, s = torch.randn(10, 6), torch.randn(10, 6), torch.randn(10, 2)
    assert torch.allclose(clf(a, b, s), clf(b, a, s))


def test_template_similarity_finds_lagged_copy():
    t = np.zeros((3, 40))
    t[0, 20], t[1, 21] = -5, -2
    shifted = np.roll(t, 2, axis=1)
    cos, diff = template_similarity(t, shifted, max_lag=3)
    assert cos == pytest.approx(1.0) and diff == pytest.approx(0.0)


def test_refractory_ratio_separates_one_neuron_from_two():
    rng = np.random.default_rng(0)
    total = 30000 * 600
    train = np.sort(rng.choice(np.arange(0, total, 150), 4000, replace=False))  # >= 5 ms apart: refractory
    same_a, same_b = train[::2], train[1::2]
    other = np.sort(rng.integers(0, total, 2000))
    assert refractory_ratio(same_a, same_b, total, 30000) < 0.1
    assert refractory_ratio(same_a, other, total, 30000) > 0.5


def test_remove_duplicates_keeps_the_more_confident():
    labels = np.array([0, 0, 0, 1])
    samples = np.array([100, 103, 500, 101])
    confidence = np.array([0.5, 0.9, 0.9, 0.9], dtype="float32")
    out = remove_duplicate_spikes(labels, samples, confidence, censor_samples=6)
    assert out.tolist() == [-1, 0, 0, 1]


def test_remove_rare_units_renumbers():
    labels = np.array([0, 0, 0, 2, 2, 2, 1, -1])
    out = remove_rare_units(labels, total_duration_s=10.0, min_firing_rate=0.2)
    assert out.tolist() == [0, 0, 0, 1, 1, 1, -1, -1]


def test_validate_params_fills_defaults_and_coerces():
    params = validate_params({"detect_threshold": 6, "train_steps": 200.0})
    assert params["detect_threshold"] == 6.0 and isinstance(params["detect_threshold"], float)
    assert params["train_steps"] == 200 and isinstance(params["train_steps"], int)
    assert set(params) == set(default_params())
    with pytest.raises(TypeError):
        validate_params({"whiten": "yes"})
    with pytest.raises(ValueError):
        validate_params({"temperature": float("nan")})


def test_every_default_is_valid_and_documented():
    for p in PARAMETERS:
        assert p.check(p.default) == p.default
        assert len(p.description) > 20


def test_docs_parameter_page_is_generated_from_params():
    from pathlib import Path

    page = Path(__file__).parents[1] / "docs" / "parameters.md"
    assert page.read_text().strip() == parameters_markdown().strip(), (
        "docs/parameters.md is stale: run `accm-sorter params --markdown > docs/parameters.md`"
    )


def test_template_matching_finds_ground_truth_spikes(short_gt):
    """Templates from 30% of each unit's spikes find the rest of them in the recording."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting
    from spikeinterface.preprocessing import bandpass_filter

    from accm_sorter.detect import estimate_noise_levels
    from accm_sorter.matching import match_spikes, unit_templates
    from accm_sorter.params import validate_params

    recording, gt = short_gt
    recording = bandpass_filter(recording, freq_min=300.0, freq_max=6000.0, dtype="float32")
    vector = gt.to_spike_vector()
    shown = np.random.default_rng(0).random(vector.size) < 0.3
    peaks = np.zeros(int(shown.sum()), dtype=[("sample_index", "int64"), ("segment_index", "int64")])
    peaks["sample_index"], peaks["segment_index"] = vector["sample_index"][shown], vector["segment_index"][shown]
    params = validate_params({})
    job_kwargs = dict(n_jobs=1, chunk_duration="1s", progress_bar=False)
    noise = estimate_noise_levels(recording, 0, job_kwargs)
    templates = unit_templates(recording, peaks, vector["unit_index"][shown], gt.get_num_units(), noise, params,
                               job_kwargs)
    spikes = match_spikes(recording, templates, noise, params, job_kwargs)
    found = NumpySorting.from_samples_and_labels([spikes["sample_index"]], [spikes["unit_index"]],
                                                 recording.sampling_frequency)
    perf = compare_sorter_to_ground_truth(gt, found, exhaustive_gt=True).get_performance()
    # measured (seed 5): 6 of 8 units at >= 0.94; the smallest unit has no template left after
    # sparsification and its spikes go partly to its neighbour (0.70)
    assert (perf["accuracy"].astype(float) >= 0.9).sum() >= 6, perf


def test_labelled_spikes_override_contradicting_matches():
    from accm_sorter.matching import spike_dtype
    from accm_sorter.pipeline import drop_rare_units, keep_labelled_spikes

    spikes = np.zeros(4, dtype=spike_dtype)
    spikes["sample_index"] = [100, 200, 300, 400]
    spikes["unit_index"] = [0, 1, 1, 0]
    labelled = np.zeros(2, dtype=[("sample_index", "int64"), ("segment_index", "int64")])
    labelled["sample_index"] = [201, 500]  # one contradicts a match, one was missed by matching
    out = keep_labelled_spikes(spikes, labelled, np.array([0, 0]), censor_samples=6)
    assert list(out["sample_index"]) == [100, 201, 300, 400, 500]
    assert list(out["unit_index"]) == [0, 0, 1, 0, 0]
    kept_spikes, kept = drop_rare_units(out, total_duration_s=10.0, min_firing_rate=0.15)
    assert list(kept) == [0] and (kept_spikes["unit_index"] == 0).all() and kept_spikes.size == 4
