"""Refine a teacher's labels over the data being labeled: label spreading on a k-NN graph.

A zero-shot FM labels each sample on its own; its features know more. Samples that lie close
together in the FM's feature space usually share a class, so each label is smoothed toward
its neighbours' labels (label spreading, Zhou et al. 2004)::

    F <- alpha * S F + (1 - alpha) * Y        (repeated; S = D^-1/2 W D^-1/2)

over the symmetric k-nearest-neighbour graph ``W`` of the L2-normalised features (cosine
similarity raised to ``SIMILARITY_POWER``, negative similarities dropped). The seeds ``Y``
are the user's labeled examples (``--few-shot``), clamped as one-hot rows, and the few-shot
teacher's probabilities on every other sample (the prior). The prior helps only when the FM
knows the classes: a weak FM's guesses, spread, outvote the labeled examples near them. Whether
it is kept is decided per run by cross-validation on the labeled examples
(``zmdevice.label_source``), not by a fixed threshold. Without labeled examples only the prior
is spread.

With a class prior (``--class-prior``: the user knows the class shares, e.g. "balanced"),
the refined labels are then rebalanced to it (``rebalance``). Spreading follows the FM's
biases: on the benchmark it left Fashion-MNIST's balanced classes with 6-14% of the label
mass each, and rebalancing raised the labels' dev accuracy there by 1-3 points, but lowered
it by 3-5 on the text set, whose classes are uneven: only the user knows which holds, so
there is no default prior.

The graph is exact: ``N^2 * D`` multiply-adds in blocks of ``BLOCK`` rows (measured for 10,000
samples without labeled examples, one thread on a shared core: 6 s at 384-d, 16 s at
1280-d; the cost grows with N^2), with ``N * NEIGHBOURS`` edges kept. Settings
were fixed on the benchmark's dev split (``docs/benchmark-protocol.md``).
"""

from __future__ import annotations

import numpy as np

from zmdevice.errors import UserError

METHOD = "label spreading on the k-NN graph of L2-normalised FM features"
"""What the refinement is, in the label file's metadata."""
NEIGHBOURS = 10
"""Neighbours per sample in the graph."""
SIMILARITY_POWER = 3.0
"""Edge weight = cosine similarity ** power: near neighbours count more."""
ALPHA = 0.9
"""How far labels travel: the share of each update that comes from the neighbours."""
ITERATIONS = 40
"""Spreading steps (alpha ** 40 < 0.015: the remaining change is negligible)."""
BLOCK = 2048
"""Rows of the similarity matrix computed at once (memory: BLOCK * N floats)."""
REBALANCE_ITERATIONS = 200
"""Most rebalancing rounds; they stop once every class's mass is within
``REBALANCE_TOLERANCE`` of its target (dozens of rounds on the benchmark's label files)."""
REBALANCE_TOLERANCE = 1e-3
"""Largest relative miss of a class's target mass at which rebalancing stops."""
MAX_SAMPLES = 1_000_000
"""Above this the exact graph costs hours on a CPU: refuse rather than appear to hang."""


def knn_graph(features: np.ndarray, neighbours: int = NEIGHBOURS, power: float = SIMILARITY_POWER):
    """The normalised symmetric k-NN graph ``S`` (torch sparse COO, coalesced, float32
    [N, N]); edge weight = cosine similarity ** ``power``."""
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
        weights.append(value.clamp_min(0).pow(power).reshape(-1))
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
    labeled_probs: np.ndarray | None = None,
    keep_prior: bool | None = None,
    class_prior: list[float] | None = None,
) -> tuple[np.ndarray, dict]:
    """Spread labels over the samples and the labeled examples together.

    With labeled examples the prior is the few-shot teacher (``zmdevice.fewshot``: a probe
    on the labeled examples times the zero-shot probabilities), kept or dropped by
    cross-validation on the labeled examples (``zmdevice.label_source.choose``).

    Args:
        features: float [N, D] FM features of the samples being labeled.
        probs: float [N, C] the teacher's zero-shot probabilities for them.
        labeled_features, labeled_classes, labeled_probs: the user's labeled examples
            (features [L, D], class ids [L], the teacher's zero-shot probabilities [L, C]),
            or None.
        keep_prior: force the prior (True: keep, False: drop), for screening both on a dev
            split; None decides by cross-validation.
        class_prior: the class shares [C] the refined labels are rebalanced to, or None
            (``zmdevice.classes.load_class_prior``).

    Returns:
        (refined probabilities float32 [N, C], what was done: the prior weight and, when it
        was decided here, the decision with each variant's cross-validated accuracy).
    """
    from zmdevice.label_source import REFINED, Evidence, choose, data_graph, make_labels

    count = len(probs)
    labeled = 0 if labeled_features is None else len(labeled_features)
    check_size(count + labeled)
    if labeled == 0:
        refined = spread(knn_graph(features), probs)
        return with_class_prior(refined, class_prior, {"prior_weight": 1.0, "labeled": 0})
    evidence = Evidence(
        np.asarray(features),
        np.asarray(probs),
        np.asarray(labeled_features),
        np.asarray(labeled_classes, dtype=np.int64),
        np.asarray(labeled_probs),
    )
    graph = data_graph(evidence)
    decision = None
    if keep_prior is None:
        decision = choose(evidence, allowed=REFINED, graph=graph)
        source = decision["chosen"]
    else:
        source = REFINED[0] if keep_prior else REFINED[1]
    refined, info = make_labels(source, evidence, class_prior, graph)
    return refined, info if decision is None else dict(info, decision=decision)


def check_size(count: int) -> None:
    """Refuse a graph too large to build in reasonable time (``MAX_SAMPLES``)."""
    if count > MAX_SAMPLES:
        raise UserError(
            f"--refine builds an exact neighbour graph, too slow beyond {MAX_SAMPLES:,} "
            "samples: label without --refine, or label a sample of the data"
        )


def with_class_prior(refined: np.ndarray, class_prior, info: dict) -> tuple[np.ndarray, dict]:
    """``refined`` as float32, rebalanced to ``class_prior`` when one is given; ``info`` gains
    the class shares before and after."""
    if class_prior is not None:
        before = refined.mean(axis=0)
        refined, rounds = rebalance(refined, class_prior)
        info = dict(
            info,
            class_prior={
                "shares": [round(float(share), 6) for share in class_prior],
                "label_shares_before": [round(float(share), 6) for share in before],
                "label_shares_after": [round(float(share), 6) for share in refined.mean(0)],
                "rounds": rounds,
            },
        )
    return refined.astype(np.float32), info


def rebalance(probs: np.ndarray, shares) -> tuple[np.ndarray, int]:
    """Labels whose class masses match ``shares``: one weight per class multiplies every
    row, rows renormalised (a change of class prior, as Bayes' rule would make it), the
    weights found by alternately scaling each class to its target mass and renormalising
    each row (Sinkhorn-Knopp).

    Args:
        probs: float [N, C] rows summing to 1.
        shares: [C] positive, summing to 1.

    Returns:
        (rebalanced float64 [N, C], the rounds it took).
    """
    # A class no row gives any mass would need an infinite weight: a floor keeps it finite.
    labels = np.asarray(probs, dtype=np.float64) + 1e-12
    labels /= labels.sum(axis=1, keepdims=True)
    target = np.asarray(shares, dtype=np.float64) * len(labels)
    rounds, miss = 0, np.inf
    while rounds < REBALANCE_ITERATIONS and miss >= REBALANCE_TOLERANCE:
        labels *= target / labels.sum(axis=0)
        labels /= labels.sum(axis=1, keepdims=True)
        miss = np.abs(labels.sum(axis=0) / target - 1).max()
        rounds += 1
    return labels, rounds


def refine_line(info: dict) -> str:
    """What the refinement did, in one line for the label command's summary."""
    if not info.get("labeled"):
        line = "refined: the FM's labels spread over the neighbour graph (no labeled examples)"
    else:
        verdict = "kept" if info["prior_weight"] else "dropped"
        line = f"refined from {info['labeled']} labeled examples; the FM's few-shot prior {verdict}"
    prior = info.get("class_prior")
    if prior:
        before, after = prior["label_shares_before"], prior["label_shares_after"]
        line += (
            f"; rebalanced to the class prior (class shares {min(before):.1%}-{max(before):.1%} "
            f"-> {min(after):.1%}-{max(after):.1%})"
        )
    return line
