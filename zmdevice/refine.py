"""Refine a teacher's labels over the data being labeled: label spreading on a k-NN graph.

A zero-shot FM labels each sample on its own; its features know more. Samples that lie close
together in the FM's feature space usually share a class, so each label is smoothed toward
its neighbours' labels (label spreading, Zhou et al. 2004)::

    F <- alpha * S F + (1 - alpha) * Y        (repeated; S = D^-1/2 W D^-1/2)

over the symmetric k-nearest-neighbour graph ``W`` of the L2-normalised features (cosine
similarity raised to ``SIMILARITY_POWER``, negative similarities dropped). The seeds ``Y``
are the user's labeled examples (``--few-shot``), clamped as one-hot rows, and the teacher's
own probabilities on every other sample, scaled by a prior weight. One weight does not fit
every FM: a prior that is right 75% of the time lifts the result, one that is right 35% of
the time drags it down. The weight is therefore chosen per run, from ``PRIOR_WEIGHTS``, by
cross-validation on the labeled examples (each fold hidden in turn and scored by the spread
labels); without labeled examples only the prior is spread.

The graph is exact: ``N^2 * D`` multiply-adds in blocks of ``BLOCK`` rows (measured for 10,000
samples without labeled examples, one thread on a shared core: 6 s at 384-d, 16 s at
1280-d; the cost grows with N^2), with ``N * NEIGHBOURS`` edges kept. Settings
were fixed on the benchmark's dev split (``docs/benchmark-protocol.md``).
"""

from __future__ import annotations

import numpy as np

from zmdevice.errors import UserError

NEIGHBOURS = 10
"""Neighbours per sample in the graph."""
SIMILARITY_POWER = 3.0
"""Edge weight = cosine similarity ** power: near neighbours count more."""
ALPHA = 0.9
"""How far labels travel: the share of each update that comes from the neighbours."""
ITERATIONS = 40
"""Spreading steps (alpha ** 40 < 0.015: the remaining change is negligible)."""
PRIOR_WEIGHTS = (0.0, 1.0)
"""Candidate weights of the teacher's probabilities as seeds, chosen by cross-validation."""
FOLDS = 4
"""Cross-validation folds over the labeled examples."""
BLOCK = 2048
"""Rows of the similarity matrix computed at once (memory: BLOCK * N floats)."""
MAX_SAMPLES = 1_000_000
"""Above this the exact graph costs hours on a CPU: refuse rather than appear to hang."""


def knn_graph(features: np.ndarray, neighbours: int = NEIGHBOURS):
    """The normalised symmetric k-NN graph ``S`` (torch sparse COO, coalesced, float32
    [N, N])."""
    import torch

    from zmdevice.fewshot import normalise

    unit = torch.from_numpy(normalise(features).astype(np.float32))
    count = unit.shape[0]
    neighbours = min(neighbours, count - 1)
    rows, cols, weights = [], [], []
    for start in range(0, count, BLOCK):
        similarity = unit[start : start + BLOCK] @ unit.T
        own = torch.arange(start, start + similarity.shape[0])
        similarity[own - start, own] = -1.0  # a sample is not its own neighbour
        value, index = similarity.topk(neighbours, dim=1)
        rows.append(own.repeat_interleave(neighbours))
        cols.append(index.reshape(-1))
        weights.append(value.clamp_min(0).pow(SIMILARITY_POWER).reshape(-1))
    rows, cols, weights = torch.cat(rows), torch.cat(cols), torch.cat(weights)
    # W + W^T: an edge counts once from each end that chose it.
    graph = torch.sparse_coo_tensor(
        torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
        torch.cat([weights, weights]),
        (count, count),
        check_invariants=False,  # built from valid indices just above
    ).coalesce()
    degree = torch.zeros(count).index_add_(0, graph.indices()[0], graph.values())
    scale = degree.clamp_min(1e-12).rsqrt()
    index = graph.indices()
    values = graph.values() * scale[index[0]] * scale[index[1]]
    normalised = torch.sparse_coo_tensor(index, values, (count, count), check_invariants=False)
    return normalised.coalesce()


def spread(graph, seeds: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Label spreading from ``seeds`` [N, C] over ``graph``; rows normalised to sum 1."""
    import torch

    start = torch.from_numpy(np.asarray(seeds, dtype=np.float32))
    labels = start.clone()
    for _ in range(ITERATIONS):
        labels = alpha * torch.sparse.mm(graph, labels) + (1 - alpha) * start
    labels = labels.clamp_min(0).numpy().astype(np.float64)
    total = labels.sum(axis=1, keepdims=True)
    # A sample no seed reaches (an isolated component without prior) stays uniform.
    uniform = np.full_like(labels, 1.0 / labels.shape[1])
    return np.where(total > 1e-12, labels / np.maximum(total, 1e-12), uniform)


def refine_labels(
    features: np.ndarray,
    probs: np.ndarray,
    labeled_features: np.ndarray | None = None,
    labeled_classes: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Spread labels over the samples and the labeled examples together.

    With labeled examples the prior is the few-shot teacher (``zmdevice.fewshot``: a probe
    on the labeled examples times the zero-shot probabilities), refitted on each fold's
    visible examples during cross-validation so a hidden example never helps predict itself.

    Args:
        features: float [N, D] FM features of the samples being labeled.
        probs: float [N, C] the teacher's zero-shot probabilities for them.
        labeled_features, labeled_classes: the user's labeled examples (features [L, D],
            class ids [L]), or None.

    Returns:
        (refined probabilities float32 [N, C], what was done: the prior weight chosen and
        the cross-validation accuracy of each candidate).
    """
    count, classes = probs.shape
    labeled = 0 if labeled_features is None else len(labeled_features)
    if count + labeled > MAX_SAMPLES:
        raise UserError(
            f"--refine builds an exact neighbour graph, too slow beyond {MAX_SAMPLES:,} "
            "samples: label without --refine, or label a sample of the data"
        )
    if labeled == 0:
        refined = spread(knn_graph(features), probs)
        return refined.astype(np.float32), {"prior_weight": 1.0, "labeled": 0}
    labeled_classes = np.asarray(labeled_classes, dtype=np.int64)
    everything = np.concatenate([np.asarray(features), np.asarray(labeled_features)])
    graph = knn_graph(everything)
    rows = count + np.arange(labeled)

    def seeds(weight: float, visible: np.ndarray) -> np.ndarray:
        """Seeds from the visible labeled examples: one-hot rows, and the few-shot
        teacher fitted on them as the prior of every other sample."""
        from zmdevice.fewshot import fit_adapter

        adapter = fit_adapter(labeled_features[visible], labeled_classes[visible], classes)
        prior = adapter.probs(features, probs) if weight else np.zeros_like(probs)
        result = np.zeros((count + labeled, classes), dtype=np.float32)
        result[:count] = weight * prior
        result[rows[visible]] = np.eye(classes, dtype=np.float32)[labeled_classes[visible]]
        return result

    folds = _folds(labeled_classes)
    scores = {}
    if np.bincount(labeled_classes, minlength=classes).min() >= 2:
        for weight in PRIOR_WEIGHTS:
            hits = 0
            for fold in np.unique(folds):
                hidden = folds == fold
                predicted = spread(graph, seeds(weight, ~hidden))[rows[hidden]].argmax(axis=1)
                hits += int((predicted == labeled_classes[hidden]).sum())
            scores[weight] = hits / labeled
        # Ties go to the prior: it still speaks where no labeled example is near.
        chosen = max(PRIOR_WEIGHTS, key=lambda weight: (scores[weight], weight))
    else:
        # A class with one example cannot be hidden and still be predicted: keep the prior.
        chosen = max(PRIOR_WEIGHTS)
    refined = spread(graph, seeds(chosen, np.ones(labeled, dtype=bool)))[:count]
    info = {
        "prior_weight": chosen,
        "labeled": labeled,
        "cross_validation": {f"{w:g}": round(s, 4) for w, s in scores.items()},
    }
    return refined.astype(np.float32), info


def _folds(classes: np.ndarray) -> np.ndarray:
    """Fold of each labeled example: the examples of each class dealt round-robin."""
    folds = np.zeros(len(classes), dtype=np.int64)
    for value in np.unique(classes):
        members = np.flatnonzero(classes == value)
        folds[members] = np.arange(len(members)) % FOLDS
    return folds
