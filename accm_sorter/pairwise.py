"""Stage 7: ACCM's binary reformulation: "are these two the same neuron?".

Instead of one multi-class problem over all units, two binary questions are learned from the
recording itself:

* spike vs cluster: a small network (``PairwiseClassifier``) trained on HDBSCAN's confident
  members as positives, the nearest *other* clusters as negatives, and augmented views (noise,
  collisions, jitter) of members as extra positives. It assigns every detected spike, including
  the ones HDBSCAN called noise and the ones never clustered, and gives each a confidence.
* cluster vs cluster: a logistic regression on template similarity, position, amplitude,
  embedding distance and a refractory-period guard. Its positives are halves of one cluster
  split the way real over-splits happen (by amplitude, by which contact peaked); its negatives
  are neighbouring clusters. It decides merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import PairwiseClassifier

NUM_SPIKE_SCALARS = 2
NEAREST_PROTOTYPES = 4
PAIR_FEATURE_NAMES = ("template_cosine", "template_difference", "embedding_distance", "location_distance",
                      "log_amplitude_ratio", "refractory_ratio")
MIN_MERGE_TEMPLATE_COSINE = 0.8
MAX_MERGE_REFRACTORY_RATIO = 0.3
# Below this many expected coincidences the refractory test cannot tell one neuron from two: it
# then reports a neutral value and abstains from vetoing the merge.
MIN_EXPECTED_COINCIDENCES = 3.0
UNINFORMATIVE_REFRACTORY_RATIO = 0.5


@dataclass
class Prototypes:
    features: np.ndarray  # (num_clusters, num_features)
    amplitudes: np.ndarray  # (num_clusters,) median |peak| in noise units


def build_prototypes(features, amplitudes, labels, probabilities, num_clusters) -> Prototypes:
    protos = np.zeros((num_clusters, features.shape[1]), dtype="float32")
    amps = np.zeros(num_clusters, dtype="float32")
    for c in range(num_clusters):
        members = labels == c
        core = members & (probabilities >= 0.5)
        use = core if core.sum() >= 5 else members
        protos[c] = np.median(features[use], axis=0)
        amps[c] = np.median(np.abs(amplitudes[use]))
    return Prototypes(protos, amps)


def _spike_pair_inputs(features, amplitudes, protos: Prototypes, candidates):
    """Inputs for (spike, candidate prototype) rows; ``candidates`` (n, k) prototype indices."""
    proto_feat = protos.features[candidates]  # (n, k, F)
    diff = features[:, None, :] - proto_feat
    log_ratio = np.abs(np.log(np.abs(amplitudes)[:, None] + 1e-3) - np.log(protos.amplitudes[candidates] + 1e-3))
    scalars = np.stack([np.sqrt((diff**2).sum(axis=2)), log_ratio], axis=2)
    spike_feat = np.broadcast_to(features[:, None, :], proto_feat.shape)
    return spike_feat.astype("float32"), proto_feat.astype("float32"), scalars.astype("float32")


def nearest_prototypes(features, protos: Prototypes, k: int) -> np.ndarray:
    k = min(k, protos.features.shape[0])
    out = np.zeros((features.shape[0], k), dtype="int64")
    proto = torch.as_tensor(protos.features)
    for start in range(0, features.shape[0], 65536):
        dist = torch.cdist(torch.as_tensor(features[start : start + 65536]), proto)
        out[start : start + dist.shape[0]] = torch.topk(dist, k, largest=False).indices.numpy()
    return out


def train_spike_classifier(features, amplitudes, labels, protos: Prototypes, seed: int, device,
                           steps: int = 300, batch_size: int = 4096) -> PairwiseClassifier:
    """Fit the spike-vs-cluster classifier on (spike, own cluster) vs (spike, neighbouring cluster)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    labelled = labels >= 0
    feats, amps, labs = features[labelled], amplitudes[labelled], labels[labelled]
    candidates = nearest_prototypes(feats, protos, NEAREST_PROTOTYPES)
    # make sure the own cluster is among the candidates of every row
    candidates = np.concatenate([labs[:, None], candidates], axis=1)
    target = (candidates == labs[:, None]).astype("float32")
    target[:, 1:][candidates[:, 1:] == labs[:, None]] = -1  # duplicate of own: ignore
    spike_feat, proto_feat, scalars = _spike_pair_inputs(feats, amps, protos, candidates)
    keep = target.reshape(-1) >= 0

    def rows(array):
        return torch.as_tensor(np.ascontiguousarray(array.reshape(-1, array.shape[2])[keep]), device=device)

    a, b, s = rows(spike_feat), rows(proto_feat), rows(scalars)
    y = torch.as_tensor(target.reshape(-1)[keep], device=device)
    num_pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - num_pos) / max(num_pos, 1.0), device=device)

    classifier = PairwiseClassifier(features.shape[1], NUM_SPIKE_SCALARS).to(device)
    optimiser = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(steps):
        pick = torch.as_tensor(rng.integers(0, len(y), size=min(batch_size, len(y))), device=device)
        logits = classifier(a[pick], b[pick], s[pick])
        loss = F.binary_cross_entropy_with_logits(logits, y[pick], pos_weight=pos_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    classifier.eval()
    return classifier


@torch.no_grad()
def assign_spikes(classifier, features, amplitudes, protos: Prototypes, threshold: float, device):
    """Best cluster for every spike by the classifier; -1 when no cluster is likely enough."""
    labels = np.full(features.shape[0], -1, dtype="int64")
    confidence = np.zeros(features.shape[0], dtype="float32")
    if protos.features.shape[0] == 0:
        return labels, confidence
    candidates = nearest_prototypes(features, protos, NEAREST_PROTOTYPES)
    for start in range(0, features.shape[0], 32768):
        sl = slice(start, start + 32768)
        spike_feat, proto_feat, scalars = _spike_pair_inputs(features[sl], amplitudes[sl], protos, candidates[sl])
        n, k = scalars.shape[:2]

        def rows(array):
            return torch.as_tensor(np.ascontiguousarray(array.reshape(n * k, -1)), device=device)

        logits = classifier(rows(spike_feat), rows(proto_feat), rows(scalars))
        prob = torch.sigmoid(logits).reshape(n, k).cpu().numpy()
        best = prob.argmax(axis=1)
        best_prob = prob[np.arange(n), best]
        confidence[sl] = best_prob
        labels[sl] = np.where(best_prob >= threshold, candidates[sl][np.arange(n), best], -1)
    return labels, confidence


# ---------------------------------------------------------------------------------- merges


def group_templates(snippets, main_channels, channel_table, groups, num_channels, max_spikes=500, seed=0):
    """Mean waveform of each group of spikes on the global channels: (num_groups, num_channels, T)."""
    rng = np.random.default_rng(seed)
    num_samples = snippets.shape[2]
    templates = np.zeros((len(groups), num_channels, num_samples), dtype="float32")
    for g, index in enumerate(groups):
        if index.size > max_spikes:
            index = np.sort(rng.choice(index, max_spikes, replace=False))
        if index.size == 0:
            continue
        acc = np.zeros((num_channels, num_samples), dtype="float64")
        count = np.zeros(num_channels)
        chans = channel_table[main_channels[index]]  # (n, K)
        np.add.at(acc, chans, snippets[index])
        np.add.at(count, chans, 1)
        well_covered = count >= 0.3 * index.size
        templates[g][well_covered] = acc[well_covered] / count[well_covered, None]
    return templates


def template_similarity(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[float, float]:
    """(best cosine similarity, best normalised squared difference) over small time lags."""
    best_cos, best_diff = -1.0, np.inf
    num_samples = a.shape[1]
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            aa, bb = a[:, lag:], b[:, : num_samples - lag]
        else:
            aa, bb = a[:, :lag], b[:, -lag:]
        na, nb = float((aa**2).sum()), float((bb**2).sum())
        if na == 0 or nb == 0:
            continue
        best_cos = max(best_cos, float((aa * bb).sum()) / np.sqrt(na * nb))
        best_diff = min(best_diff, float(((aa - bb) ** 2).sum()) / (na + nb))
    return best_cos, (best_diff if np.isfinite(best_diff) else 2.0)


def two_neurons_by_trains(ratio: float) -> bool:
    """Whether a :func:`refractory_ratio` says two neurons: informative, and over what one neuron's pieces may show."""
    return ratio > MAX_MERGE_REFRACTORY_RATIO and ratio != UNINFORMATIVE_REFRACTORY_RATIO


def refractory_ratio(train_a, train_b, total_samples, sampling_frequency, low_ms=0.3, high_ms=1.5) -> float:
    """Observed / expected number of cross pairs at lags where one neuron cannot fire twice."""
    low = int(low_ms * sampling_frequency / 1000)
    high = int(high_ms * sampling_frequency / 1000)
    if train_a.size == 0 or train_b.size == 0:
        return 1.0
    left = np.searchsorted(train_b, train_a - high, side="left")
    inner_left = np.searchsorted(train_b, train_a - low, side="left")
    inner_right = np.searchsorted(train_b, train_a + low, side="right")
    right = np.searchsorted(train_b, train_a + high, side="right")
    observed = float((inner_left - left).sum() + (right - inner_right).sum())
    expected = train_a.size * train_b.size * 2 * (high - low) / max(total_samples, 1)
    if expected < MIN_EXPECTED_COINCIDENCES:
        return UNINFORMATIVE_REFRACTORY_RATIO
    return observed / expected


@dataclass
class GroupSummary:
    template: np.ndarray
    feature: np.ndarray
    amplitude: float
    train: np.ndarray  # sorted global sample indices


def summarise_groups(groups, snippets, main_channels, channel_table, features, amplitudes, samples,
                     num_channels, seed) -> list[GroupSummary]:
    templates = group_templates(snippets, main_channels, channel_table, groups, num_channels, seed=seed)
    return [
        GroupSummary(templates[g], np.median(features[idx], axis=0), float(np.median(np.abs(amplitudes[idx]))),
                     np.sort(samples[idx]))
        for g, idx in enumerate(groups)
    ]


def cluster_pair_features(a: GroupSummary, b: GroupSummary, max_lag, total_samples, sampling_frequency,
                          num_embedding_dims) -> np.ndarray:
    cos, diff = template_similarity(a.template, b.template, max_lag)
    emb_dist = float(np.linalg.norm(a.feature[:num_embedding_dims] - b.feature[:num_embedding_dims]))
    loc_dist = float(np.linalg.norm(a.feature[num_embedding_dims:] - b.feature[num_embedding_dims:]))
    amp_ratio = abs(np.log(a.amplitude + 1e-3) - np.log(b.amplitude + 1e-3))
    refractory = refractory_ratio(a.train, b.train, total_samples, sampling_frequency)
    return np.array([cos, diff, emb_dist, loc_dist, amp_ratio, min(refractory, 3.0)], dtype="float64")


def same_neuron_splits(index, amplitudes, main_channels, min_size):
    """Ways one cluster gets over-split in practice: by amplitude and by which contact peaked."""
    splits = []
    if index.size < 2 * min_size:
        return splits
    order = index[np.argsort(np.abs(amplitudes[index]))]
    half = order.size // 2
    splits.append((order[:half], order[half:]))
    chans, counts = np.unique(main_channels[index], return_counts=True)
    if chans.size >= 2:
        top = chans[np.argsort(-counts)[:2]]
        first, second = index[main_channels[index] == top[0]], index[main_channels[index] == top[1]]
        if first.size >= min_size and second.size >= min_size:
            splits.append((first, second))
    return splits


def merge_clusters(labels, snippets, main_channels, channel_table, features, amplitudes, samples, num_channels,
                   num_embedding_dims, total_samples, sampling_frequency, threshold, min_size, seed, log=print):
    """Merge clusters the cluster-pair classifier calls the same neuron; return new labels and a report.

    ``report["cluster_map"][old_label]`` is the label each input cluster ends up with.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_clusters = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    report = {"num_clusters_before": num_clusters, "merges": [], "cluster_map": list(range(num_clusters))}
    if num_clusters < 2:
        return labels, report
    max_lag = max(1, int(0.2 * sampling_frequency / 1000))
    members = [np.flatnonzero(labels == c) for c in range(num_clusters)]
    kwargs = dict(snippets=snippets, main_channels=main_channels, channel_table=channel_table, features=features,
                  amplitudes=amplitudes, samples=samples, num_channels=num_channels, seed=seed)
    summaries = summarise_groups(members, **kwargs)
    pair_kw = dict(max_lag=max_lag, total_samples=total_samples, sampling_frequency=sampling_frequency,
                   num_embedding_dims=num_embedding_dims)

    # candidate pairs: each cluster and its nearest neighbours in feature space
    centroids = np.stack([s.feature for s in summaries])
    dist = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1)[:, : min(3, num_clusters - 1)]
    candidates = sorted({(min(a, b), max(a, b)) for a in range(num_clusters) for b in neighbours[a]})
    x_candidates = np.stack([cluster_pair_features(summaries[a], summaries[b], **pair_kw) for a, b in candidates])

    positives = []
    for c in range(num_clusters):
        for part_a, part_b in same_neuron_splits(members[c], amplitudes, main_channels, min_size):
            sa, sb = summarise_groups([part_a, part_b], **kwargs)
            positives.append(cluster_pair_features(sa, sb, **pair_kw))
    if len(positives) < 3:
        log("merge: too few clusters large enough to learn what an over-split looks like; no merge")
        return labels, report
    x = np.vstack([np.stack(positives), x_candidates])
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(candidates))])
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000))
    model.fit(x, y)
    prob = model.predict_proba(x_candidates)[:, 1]
    report["candidates"] = [
        dict(a=int(a), b=int(b), probability=float(p), **dict(zip(PAIR_FEATURE_NAMES, map(float, feats))))
        for (a, b), p, feats in zip(candidates, prob, x_candidates)
    ]

    # Agglomerate in order of confidence. A merge joins whole groups, so it must pass the guards
    # against every candidate pair across the two groups: otherwise A~B and B~C would fuse A and C
    # even when A and C are two neurons by their refractory periods.
    def guards_pass(feats):
        refractory_ok = feats[5] <= MAX_MERGE_REFRACTORY_RATIO or feats[5] == UNINFORMATIVE_REFRACTORY_RATIO
        return refractory_ok and feats[0] >= MIN_MERGE_TEMPLATE_COSINE

    pair_features = {pair: feats for pair, feats in zip(candidates, x_candidates)}
    group_of = list(range(num_clusters))
    groups = {c: {c} for c in range(num_clusters)}
    for order in np.argsort(-prob):
        (a, b), p, feats = candidates[order], prob[order], x_candidates[order]
        ga, gb = group_of[a], group_of[b]
        if p < threshold or ga == gb or not guards_pass(feats):
            continue
        across = [pair_features[(min(x, y), max(x, y))] for x in groups[ga] for y in groups[gb]
                  if (min(x, y), max(x, y)) in pair_features]
        if not all(guards_pass(f) for f in across):
            continue
        for member in groups[gb]:
            group_of[member] = ga
        groups[ga] |= groups.pop(gb)
        report["merges"].append(dict(a=int(a), b=int(b), probability=float(p), template_cosine=float(feats[0]),
                                     refractory_ratio=float(feats[5])))
    roots = np.array(group_of)
    _, new_ids = np.unique(roots, return_inverse=True)
    new_labels = np.where(labels >= 0, new_ids[np.clip(labels, 0, None)], -1)
    report["num_clusters_after"] = int(new_ids.max()) + 1
    report["cluster_map"] = new_ids.tolist()
    return new_labels, report
