"""`zmdevice check`: labeled examples that look mislabeled, and doubtful pseudo-labels.

Every labeled example gets probabilities from models that never saw it: a logistic probe
on the FM's unit features (plus the FM's zero-shot log-probabilities as a fixed offset, the
few-shot adapter's product of experts) is fitted on K-1 of K stratified folds and predicts
the K-th, and is averaged with a vote of the example's nearest labeled neighbours
(``neighbour_vote``: per class, the mean similarity of its ``NEIGHBOURS`` most similar other
examples of that class, softmaxed), which sees the local structure a linear probe on a few
examples a class smooths over. With a student, its probabilities are averaged in (it was
trained on these labels, so it speaks for them more than the probe does).

Ranking (confident learning, Northcutt et al. 2021, written here): every example is ranked
by its normalised margin p(given) - max p(other), lowest first; its score is
(1 - margin) / 2 in [0, 1]. Each class j gets the threshold t_j = the mean probability of j
over the examples labeled j, and an example is *flagged* when another class clears its
threshold, is the most probable class that does, and is more probable than the given one
(an off-diagonal cell of the confident joint). Flags do not reorder the ranking: on the
synthetic benchmark (``benchmarks/bench_loop.py``) putting flagged rows first found fewer
planted flips in the top rows than the margin alone, which is also what
``cleanlab_ranking`` (``cleanlab.filter.find_label_issues``, an optional package) ranks by;
both are there so the benchmark can compare them on the same probabilities.

Pseudo-label suspects: the probe fitted on all labeled examples predicts the data; a
pseudo-label is a suspect when the probe's class differs and clears its threshold while
the pseudo-label's class does not. They are counted per FM class.

Cost: the probe is full-batch L-BFGS in float32 on features reduced to their top
``probe_dims`` principal directions, warm-started fold to fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zmdevice.curation.settings import CheckConfig
from zmdevice.errors import UserError, check_writable, listing
from zmdevice.label_source import deal_folds as stratified_folds
from zmdevice.runtime import softmax

ZERO_SHOT_WEIGHT = 0.25
"""Weight of the FM's log-probabilities in the probe's logits (``fewshot``'s default)."""
PROBABILITY_FLOOR = 1e-6
NEIGHBOURS = 3
"""Neighbours per class in ``neighbour_vote``."""
VOTE_TEMPERATURE = 0.1
"""Softmax temperature of ``neighbour_vote``'s mean cosine similarities. The vote and both
settings were chosen on the six benchmark domains' dev splits (100 draws of 4 labels a
class, 1 in 8 flipped; the best of ten variants, then 100 fresh draws of the same 200-row
splits): flips found in the top 2x rows +3.4 points on 25 noun groups, -0.2 to +0.8
elsewhere. On the pools of the loop benchmark the gain did not show (-3.3 to +1.0 points a
domain; ``docs/benchmark-protocol.md``)."""
ROW_BLOCK = 1024
"""Rows of the similarity matrix ``neighbour_vote`` holds at once."""


# ------------------------------------------------------------------------ the probe


class Probe:
    """Multinomial logistic regression on projected features with a fixed logit offset."""

    def __init__(self, x: np.ndarray, probe_dims: int | None):
        """Fix the projection: the top ``probe_dims`` principal directions of ``x``
        [L, D] (all directions when D is not larger)."""
        x = np.asarray(x, np.float64)
        self.mean = x.mean(axis=0)
        if probe_dims is None or probe_dims >= x.shape[1]:
            self.basis = None
        else:
            centred = x - self.mean
            _, vectors = np.linalg.eigh(centred.T @ centred)
            self.basis = vectors[:, ::-1][:, :probe_dims].astype(np.float32)
        self.weight = None

    def project(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32) - self.mean.astype(np.float32)
        return x if self.basis is None else x @ self.basis

    def fit(self, z, y, offset, num_classes: int, l2: float, max_iter: int) -> Probe:
        """Fit on projected rows ``z`` [L, d], class ids ``y``, logit offsets [L, C];
        starts from the previous fit's weights (warm start). Classes with unequal numbers of
        rows count equally (``fewshot.class_balance``)."""
        import torch

        from zmdevice.fewshot import class_balance

        z = torch.from_numpy(np.ascontiguousarray(z, np.float32))
        targets = torch.from_numpy(np.asarray(y, np.int64))
        shift = torch.from_numpy(np.asarray(offset, np.float32))
        if self.weight is None:
            self.weight = np.zeros((z.shape[1], num_classes), np.float32)
            self.bias = np.zeros(num_classes, np.float32)
        weight = torch.tensor(self.weight, requires_grad=True)
        bias = torch.tensor(self.bias, requires_grad=True)
        balance = class_balance(y, num_classes)
        balance = None if balance is None else torch.from_numpy(balance.astype(np.float32))
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            logits = z @ weight + bias + shift
            loss = torch.nn.functional.cross_entropy(logits, targets, weight=balance)
            loss = loss + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = weight.detach().numpy(), bias.detach().numpy()
        return self

    def probs(self, z: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """float32 [N, C] probabilities of projected rows ``z`` [N, d]."""
        return softmax(z @ self.weight + self.bias + offset)


def prior_offset(fm_probs: np.ndarray | None, num_rows: int, num_classes: int) -> np.ndarray:
    """ZERO_SHOT_WEIGHT * log max(p0, floor) [N, C]; zeros without FM probabilities."""
    if fm_probs is None:
        return np.zeros((num_rows, num_classes), np.float32)
    floor = np.maximum(np.asarray(fm_probs, np.float32), PROBABILITY_FLOOR)
    return (ZERO_SHOT_WEIGHT * np.log(floor)).astype(np.float32)


def cross_val_probs(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    fm_probs: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1e-3,
    probe_dims: int | None = 128,
    max_iter: int = 100,
) -> tuple[np.ndarray, Probe]:
    """Out-of-fold probabilities of the probe: no example predicts itself.

    Args:
        x: float [L, D] unit feature rows of the labeled examples.
        y: int [L] their (given) class ids.
        num_classes: C.
        fm_probs: float [L, C] FM probabilities (the probe's fixed prior), or None.
        folds: K; at most the size of the largest class.

    Returns:
        (float32 [L, C] held-out probabilities, the probe refitted on all examples).
    """
    y = np.asarray(y, np.int64)
    folds = max(2, min(folds, int(np.bincount(y).max())))
    probe = Probe(x, probe_dims)
    z = probe.project(x)
    offset = prior_offset(fm_probs, len(y), num_classes)
    fold = stratified_folds(y, folds, seed)
    held_out = np.zeros((len(y), num_classes), np.float32)
    for k in range(folds):
        test = fold == k
        if not test.any():
            continue
        probe.fit(z[~test], y[~test], offset[~test], num_classes, l2, max_iter)
        held_out[test] = probe.probs(z[test], offset[test])
    probe.fit(z, y, offset, num_classes, l2, max_iter)
    return held_out, probe


def neighbour_vote(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    neighbours: int = NEIGHBOURS,
    temperature: float = VOTE_TEMPERATURE,
) -> np.ndarray:
    """Leave-one-out class probabilities from each example's nearest labeled neighbours.

    Args:
        x: float [L, D] unit feature rows.
        y: int [L] their class ids.

    Returns:
        float32 [L, C]: softmax over classes of (the mean cosine similarity of the example's
        ``neighbours`` most similar other examples of the class, fewer where the class has
        fewer; -1 where it has none) / ``temperature``. No example votes for itself.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    closeness = np.full((len(y), num_classes), -1.0, np.float32)
    for start in range(0, len(y), ROW_BLOCK):
        rows = np.arange(start, min(start + ROW_BLOCK, len(y)))
        similarity = x[rows] @ x.T
        similarity[np.arange(len(rows)), rows] = -np.inf
        for c in np.unique(y):
            members = similarity[:, y == c]
            take = min(neighbours, members.shape[1])
            nearest = -np.partition(-members, take - 1, axis=1)[:, :take]
            # An example alone in its class sees itself only (-inf): no neighbour there.
            finite = np.isfinite(nearest)
            count = finite.sum(axis=1)
            total = np.where(finite, nearest, 0.0).sum(axis=1)
            closeness[rows, c] = np.where(count > 0, total / np.maximum(count, 1), -1.0)
    return softmax(closeness / temperature)


# ------------------------------------------------------------------------ the rankings


@dataclass(frozen=True)
class Issues:
    """Labeled examples ranked by how likely their label is wrong."""

    order: np.ndarray
    """int64 [L] example indices, most suspicious first."""
    score: np.ndarray
    """float [L] per example (not in order): (1 - normalised margin) / 2; NaN unchecked."""
    flagged: np.ndarray
    """bool [L] per example: a confident disagreement with the given label."""
    suggested: np.ndarray
    """int64 [L] per example: the class the probabilities favour."""
    thresholds: np.ndarray
    """float [C] per-class confidence thresholds t_j (NaN for unchecked classes)."""


def class_thresholds(probs: np.ndarray, labels: np.ndarray, checked: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the checked examples labeled j."""
    num_classes = probs.shape[1]
    thresholds = np.full(num_classes, np.nan)
    for j in range(num_classes):
        rows = checked & (labels == j)
        if rows.any():
            thresholds[j] = probs[rows, j].mean()
    return thresholds


def confident_issues(probs: np.ndarray, labels: np.ndarray, min_per_class: int = 2) -> Issues:
    """Rank examples by normalised margin; flag confident disagreements (module docstring).

    Examples of a class with fewer than ``min_per_class`` examples are not checked (their
    held-out probe never saw their class): score NaN, never flagged, ranked last.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))
    counts = np.bincount(labels, minlength=probs.shape[1])
    checked = counts[labels] >= min_per_class
    thresholds = class_thresholds(probs, labels, checked)
    given = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    margin = given - others.max(axis=1)
    score = np.where(checked, (1.0 - margin) / 2.0, np.nan)
    clears = probs >= np.where(np.isnan(thresholds), np.inf, thresholds)[None, :]
    confident = np.where(clears, probs, -np.inf)
    best = confident.argmax(axis=1)
    flagged = checked & clears.any(axis=1) & (best != labels) & (probs[rows, best] > given)
    # The class to look at instead: the confident one if flagged, else the runner-up.
    suggested = np.where(flagged, best, others.argmax(axis=1))
    order = np.lexsort((rows, -np.where(np.isnan(score), -1.0, score)))
    return Issues(order.astype(np.int64), score, flagged, suggested.astype(np.int64), thresholds)


def cleanlab_ranking(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ranking of the same probabilities (``cleanlab.filter.find_label_issues``,
    pruned by noise rate, ranked by normalised margin).

    Returns:
        (int64 order of all examples: cleanlab's issues first, then the rest by margin;
        bool [L] cleanlab's issues).

    Raises:
        UserError: cleanlab is not installed.
    """
    try:
        from cleanlab.filter import find_label_issues
    except ModuleNotFoundError:
        raise UserError(
            "--method cleanlab needs the Python package 'cleanlab': pip install cleanlab"
        ) from None
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = np.asarray(labels, np.int64)
    ranked = np.asarray(
        find_label_issues(labels, probs, return_indices_ranked_by="normalized_margin"),
        np.int64,
    )
    flagged = np.zeros(len(labels), bool)
    flagged[ranked] = True
    rows = np.arange(len(labels))
    others = probs.copy()
    others[rows, labels] = -np.inf
    margin = probs[rows, labels] - others.max(axis=1)
    rest = np.flatnonzero(~flagged)
    rest = rest[np.lexsort((rest, margin[rest]))]
    return np.concatenate([ranked, rest]), flagged


def pseudo_label_suspects(
    probe_probs: np.ndarray, fm_probs: np.ndarray, thresholds: np.ndarray, classes: list[str]
) -> dict[str, dict]:
    """Per FM class: how many pseudo-labels the probe confidently disputes.

    Returns:
        class -> {"count": pseudo-labels of the class, "suspects": disputed ones,
        "share": suspects / count, "instead": the probe's most frequent class among them
        (None when no suspect)}.
    """
    fm = fm_probs.argmax(axis=1)
    probe = probe_probs.argmax(axis=1)
    rows = np.arange(len(fm))
    limit = np.where(np.isnan(thresholds), np.inf, thresholds)
    suspect = (
        (probe != fm)
        & (probe_probs[rows, probe] >= limit[probe])
        & (probe_probs[rows, fm] < limit[fm])
    )
    result = {}
    for c, name in enumerate(classes):
        members = fm == c
        disputed = probe[members & suspect]
        count, suspects = int(members.sum()), int(len(disputed))
        instead = classes[int(np.bincount(disputed).argmax())] if suspects else None
        result[name] = {
            "count": count,
            "suspects": suspects,
            "share": suspects / count if count else 0.0,
            "instead": instead,
        }
    return result


# ------------------------------------------------------------------------ the command


def run_check(config: CheckConfig) -> dict:
    """Rank ``config.labeled`` by how likely each label is wrong; count the pseudo-label
    suspects per class; write the ranked examples to ``config.out`` (CSV).

    Returns:
        Summary: ``out``, ``method``, ``flagged`` (count), ``rows`` (the written rows),
        ``pseudo_label_suspects`` (per class, see ``pseudo_label_suspects``), ``lines``.
    """
    from zmdevice.curation.fm_space import settings_space, student_probs

    out = Path(config.out or "label-check.csv")
    check_writable(out, "--out", suffix=".csv")
    space = settings_space(config)
    classes, y = space.classes, space.labeled_y
    counts = np.bincount(y, minlength=len(classes))
    if int((counts >= 2).sum()) < 2:
        has = listing(f"{classes[c]} {counts[c]}" for c in np.flatnonzero(counts))
        raise UserError(
            f"--labeled {config.labeled}: checking needs at least 2 classes with 2 or more "
            f"examples each (has {has}); label more examples first"
        )
    held_out, probe = cross_val_probs(
        space.labeled_x, y, len(classes), fm_probs=space.labeled_probs, folds=config.folds,
        seed=config.seed, l2=config.l2, probe_dims=config.probe_dims, max_iter=config.max_iter,
    )  # fmt: skip
    probs = 0.5 * (held_out + neighbour_vote(space.labeled_x, y, len(classes)))
    if config.student is not None:
        probs = 0.5 * (held_out + student_probs(
            config.student, space.labeled, classes, device=config.device,
            batch_size=config.batch_size,
        ))  # fmt: skip
    issues = confident_issues(probs, y)
    order, flagged = issues.order, issues.flagged
    if config.method == "cleanlab":
        order, flagged = cleanlab_ranking(probs, y)
    data_probs = probe.probs(
        probe.project(space.x), prior_offset(space.fm_probs, len(space.x), len(classes))
    )
    suspects = pseudo_label_suspects(data_probs, space.fm_probs, issues.thresholds, classes)
    rows = _rows(space, probs, issues, order, flagged)
    from zmdevice.curation.label_studio import write_rows_csv

    write_rows_csv(rows, out, CSV_COLUMNS, space.labeled.modality)
    worst = sorted(suspects.items(), key=lambda item: -item[1]["share"])
    lines = [
        f"wrote {out}: {len(rows)} labeled examples ranked ({config.method}); "
        f"{int(flagged.sum())} look mislabeled",
        "  pseudo-labels the probe disputes, by FM class: "
        + listing(f"{name} {s['suspects']}/{s['count']}" for name, s in worst if s["count"]),
    ]
    return {
        "out": str(out),
        "method": config.method,
        "flagged": int(flagged.sum()),
        "rows": rows,
        "pseudo_label_suspects": suspects,
        "space": space.kind,
        "lines": lines,
    }


def _rows(space, probs, issues: Issues, order, flagged) -> list[dict]:
    dataset, classes, y = space.labeled, space.classes, space.labeled_y
    rows = []
    for i in order:
        i = int(i)
        given, other = int(y[i]), int(issues.suggested[i])
        row = {"id": dataset.ids[i]}
        if dataset.modality == "text":
            row["text"] = dataset.texts[i]
        else:
            row["path"] = str(Path(dataset.paths[i]).absolute())
        score = issues.score[i]
        if np.isnan(score):
            reason = "not checked: too few examples of its class"
        elif flagged[i]:
            reason = (
                f"probe says {classes[other]} (p={probs[i, other]:.2f}), "
                f"label {classes[given]} (p={probs[i, given]:.2f})"
            )
        else:
            reason = f"agrees with the label (p={probs[i, given]:.2f})"
        row.update(
            label=classes[given],
            suggested=classes[other],
            p_label=round(float(probs[i, given]), 4),
            score="" if np.isnan(score) else round(float(score), 4),
            flagged=bool(flagged[i]),
            reason=reason,
        )
        rows.append(row)
    return rows


CSV_COLUMNS = ["id", "CONTENT", "label", "suggested", "p_label", "score", "flagged", "reason"]
"""The columns of ``check``'s CSV (``CONTENT``: text or path); itself a --labeled table."""
