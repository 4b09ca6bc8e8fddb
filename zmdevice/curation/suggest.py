"""`zmdevice suggest`: which unlabeled samples a person should label next.

Two regimes, chosen from what exists:

- **Cold start** (no student and fewer than ``cold_start_per_class`` labels per class): the
  data is clustered in the FM's feature space (k-means, k-means++ start from the seed) into
  more clusters than there are picks; clusters that hold a labeled example are covered, and
  the sample nearest the centre of each uncovered cluster (its most typical member) is a
  candidate. Slots go round-robin over the FM's classes (the class most of a cluster's
  samples are given; least-labeled classes first, then the larger clusters), so the first
  rows cover the classes the FM predicts while every pick comes from its own region of
  the data (``cold_start``).
- **Later rounds**: a committee of the FM's probabilities, the few-shot adapter fitted on
  the labeled examples (``fewshot.fit_adapter``, the FM's prior included) and the
  student's probabilities. A sample's score is the mean of the consensus's uncertainty
  (1 - top-2 margin of the mean probabilities) and the committee's disagreement (the
  Jensen-Shannon divergence of its members, over its maximum log M). The ``candidates`` x n
  best are then picked greedily for diversity (a k-center greedy weighted by the score):
  each pick maximises score x min(1, distance to the nearest labeled or picked sample /
  the median distance between two candidates), so near-duplicates of what is known or
  chosen wait their turn.

Once some labels exist, classes without a labeled example are looked for first: a class
never labeled cannot be learned from the labels, and ``label --few-shot`` drops the FM's
prior only with an example of every class. Up to ``DISCOVERY_SHARE`` of a round's picks go
to that search (``discover``), led by the FM only where the labeled examples show it knows
something, as ``label_source`` decides whether to keep its prior: when the FM's zero-shot
labels of them are above chance (the binomial test at ``PRIOR_SIGNIFICANCE``), each missing
class gets the sample the FM gives that class the highest probability; otherwise the picks
are typical points of the clusters farthest from every labeled example (``far_typical``),
and a cold start round is made of those alone, since balancing over FM classes no better
than chance balances nothing. Simulated on five pools (WordNet topics, verb groups, noun
groups and parts of speech with MiniLM; digits with an ImageNet FM 9% right), 4 rounds of
C picks answered with the true labels, 5 seeds: true classes covered after the second and
third rounds went from 10.8 / 11.8 to 14.0 / 14.6 of 15 verb groups, 23.4 / 24.2 to 24.4 /
24.6 of 25 noun groups, 9.2 / 9.4 to 9.8 / 10 of 10 digits, 3.6 / 3.8 to 3.8 / 4 of 4 parts
of speech, and 7.8 / 7.8 to 7.6 / 7.8 of 8 topics (8.0 after the fourth).

Both are deterministic for a seed. The output (CSV or Label Studio tasks) lists the best
first with the FM's guess, the student's, the score, the reason and an empty ``label``
column; the CSV, with labels filled in (rows left empty dropped by
``filled_suggestions``), is a ``--labeled`` table.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zmdevice.curation.settings import SuggestConfig
from zmdevice.errors import UserError, atomic_path, check_writable, listing


@dataclass(frozen=True)
class Ranked:
    """Suggested rows of the data, best first."""

    index: np.ndarray
    """int64 [n] rows of the data."""
    score: np.ndarray
    """float [n] priority score (cold start: the cluster's share of the candidates)."""
    reason: list[str]
    """Why each was suggested."""
    mode: str
    """"cold start" or "uncertainty"."""


# ------------------------------------------------------------------------ the rankings


DISCOVERY_SHARE = 0.5
"""At most this share of a round's picks (rounded up) looks for classes without a labeled
example; the rest follow the round's regime."""

OVERCLUSTER = 2
"""Cold start clusters the data into (labeled examples + OVERCLUSTER x n) clusters, so that
the n picks can be balanced across the FM's classes while each comes from its own cluster."""


def cold_start(
    x: np.ndarray,
    fm_probs: np.ndarray,
    n: int,
    *,
    allowed: np.ndarray | None = None,
    labeled_counts: np.ndarray | None = None,
    labeled_x: np.ndarray | None = None,
    classes: list[str] | None = None,
    seed: int = 0,
) -> Ranked:
    """Typical points of clusters no labeled example covers, balanced across the FM's
    predicted classes.

    The allowed samples are clustered together (k-means, k-means++ start from the seed) into
    ``len(labeled_x) + OVERCLUSTER * n`` clusters; a cluster whose centre is the nearest one
    to a labeled example is covered. The picks are the typical members (nearest the centre)
    of uncovered clusters, taken round-robin over the FM's classes (each cluster counts for
    the class most of its samples are given; classes with fewer labels first, then the one
    with the larger cluster), largest cluster first within a class. Clusters are made over
    all the data, not within each FM class: an FM near chance splits the data into classes
    that overlap, and the typical points of its classes lie side by side in one region (on
    4 parts of speech, MiniLM 39% right, the first 8 picks were all of one true class).

    Args:
        x: float32 [N, D] unit feature rows.
        fm_probs: float32 [N, C] FM probabilities.
        n: how many to pick (fewer when fewer are allowed).
        allowed: bool [N], samples that may be picked (default all).
        labeled_counts: int [C] labels per class so far (classes with fewer go first).
        labeled_x: [L, D] unit rows of the labeled examples (their clusters are covered).
        classes: class names for the reasons.
        seed: k-means++ seed.
    """
    num_classes = fm_probs.shape[1]
    classes = classes or [str(c) for c in range(num_classes)]
    allowed = np.ones(len(x), bool) if allowed is None else allowed
    labeled_counts = np.zeros(num_classes) if labeled_counts is None else labeled_counts
    labeled_x = np.zeros((0, x.shape[1]), x.dtype) if labeled_x is None else labeled_x
    rows, clusters = _clusters(x, allowed, n, len(labeled_x), seed)
    n = min(n, len(rows))
    if n == 0:
        return Ranked(np.zeros(0, np.int64), np.zeros(0), [], "cold start")
    covered = set()
    if len(labeled_x):
        centres = np.stack([c for _, _, c in clusters])
        closeness = labeled_x @ centres.T - 0.5 * np.sum(centres**2, axis=1)
        covered = set(np.argmax(closeness, axis=1).tolist())
    guess = fm_probs.argmax(axis=1)
    by_class: dict[int, list[tuple[int, int, int]]] = {}
    # Uncovered clusters first; covered ones only when too few are left to fill n.
    ranked = sorted(range(len(clusters)), key=lambda number: number in covered)
    for number in ranked[: max(n, len(clusters) - len(covered))]:
        local, members, _ = clusters[number]
        fm_class = int(np.bincount(guess[rows[members]], minlength=num_classes).argmax())
        by_class.setdefault(fm_class, []).append((int(rows[local]), len(members), number))
    order = sorted(by_class, key=lambda c: (labeled_counts[c], -by_class[c][0][1], c))
    index, score, reason = [], [], []
    total = len(rows)
    while len(index) < n:
        for c in order:
            if len(index) < n and by_class[c]:
                row, size, number = by_class[c].pop(0)
                index.append(row)
                score.append(size / total)
                which = (
                    "a labeled example already covers"
                    if number in covered
                    else "no labeled example covers"
                )
                reason.append(
                    f"cold start: typical of a cluster of {size} samples {which}, most of them "
                    f"FM class {classes[c]}"
                )
    return Ranked(np.asarray(index, np.int64), np.asarray(score), reason, "cold start")


def _clusters(x, allowed, n: int, labeled: int, seed: int) -> tuple[np.ndarray, list]:
    """(the allowed rows, their ``_typical_points`` clusters: ``labeled + OVERCLUSTER * n``
    of them, k-means++ started from ``seed``); no clusters when no row or pick is left."""
    rows = np.flatnonzero(allowed)
    if min(n, len(rows)) == 0:
        return rows, []
    rng = np.random.default_rng(seed)
    return rows, _typical_points(x[rows], min(len(rows), labeled + OVERCLUSTER * n), rng)


def _typical_points(x: np.ndarray, k: int, rng, iterations: int = 10) -> list[tuple]:
    """k-means clusters of ``x``, largest first: (row nearest the centre, the cluster's rows,
    its centre). With fewer distinct rows than ``k`` some clusters are single rows picked
    far from every other cluster (k-center), so that ``k`` come back."""
    if k >= len(x):
        return [(i, np.array([i]), x[i].astype(np.float64)) for i in range(len(x))]
    # k-means++ start: each next centre drawn with probability ~ squared distance.
    centres = [int(rng.integers(len(x)))]
    nearest = np.full(len(x), np.inf)
    for _ in range(k - 1):
        nearest = np.minimum(nearest, np.sum((x - x[centres[-1]]) ** 2, axis=1))
        total = nearest.sum()
        centres.append(int(rng.choice(len(x), p=nearest / total)) if total > 0 else len(centres))
    centre = x[centres].astype(np.float64)
    for _ in range(iterations):
        assign = np.argmax(x @ centre.T - 0.5 * np.sum(centre**2, axis=1), axis=1)
        for j in range(k):
            if np.any(assign == j):
                centre[j] = x[assign == j].mean(axis=0)
    closeness = x @ centre.T - 0.5 * np.sum(centre**2, axis=1)  # nearest centre = largest
    assign = np.argmax(closeness, axis=1)
    result = []
    for j in np.argsort(-np.bincount(assign, minlength=k), kind="stable"):
        rows = np.flatnonzero(assign == j)
        if len(rows):  # clusters are disjoint: their typical rows differ
            result.append((int(rows[np.argmax(closeness[rows, j])]), rows, centre[j]))
    # A cluster that ended empty (duplicates): its slot goes to the row farthest from
    # every pick (k-center).
    far = np.full(len(x), np.inf)
    for row, _, _ in result:
        far = np.minimum(far, np.sum((x - x[row]) ** 2, axis=1))
        far[row] = -np.inf
    while len(result) < k:
        row = int(np.argmax(far))
        result.append((row, np.array([row]), x[row].astype(np.float64)))
        far = np.minimum(far, np.sum((x - x[row]) ** 2, axis=1))
        far[row] = -np.inf
    return result


def fm_shown_above_chance(labeled_probs: np.ndarray, labeled_y: np.ndarray) -> bool:
    """Whether the FM's zero-shot labels of the labeled examples are right more often than
    chance would make them (``label_source.above_chance`` at ``PRIOR_SIGNIFICANCE``)."""
    from zmdevice.label_source import PRIOR_SIGNIFICANCE, above_chance

    return len(labeled_y) > 0 and above_chance(labeled_probs, labeled_y)[1] < PRIOR_SIGNIFICANCE


def fm_confident(
    fm_probs: np.ndarray, wanted: np.ndarray, *, allowed: np.ndarray, classes: list[str]
) -> Ranked:
    """For each class in ``wanted``, in order: the allowed sample the FM gives that class
    the highest probability among those it labels that class (among all allowed samples
    when it labels none so)."""
    guess = fm_probs.argmax(axis=1)
    free = allowed.copy()
    index, score, reason = [], [], []
    for c in wanted:
        pool = np.flatnonzero(free & (guess == c))
        pool = pool if len(pool) else np.flatnonzero(free)
        if not len(pool):
            break
        row = int(pool[np.argmax(fm_probs[pool, c])])
        free[row] = False
        index.append(row)
        score.append(float(fm_probs[row, c]))
        reason.append(
            f"no labeled example of {classes[c]} yet: the FM's most confident {classes[c]} "
            f"(p={fm_probs[row, c]:.2f}; its labels of the labeled examples beat chance)"
        )
    return Ranked(np.asarray(index, np.int64), np.asarray(score), reason, "discovery")


def far_typical(
    x: np.ndarray, n: int, *, allowed: np.ndarray, labeled_x: np.ndarray, seed: int = 0
) -> Ranked:
    """Typical points of clusters, farthest first from every labeled example and earlier
    pick (a k-center greedy over the clusters' typical points): the regions of the data the
    labels know least, where a class nobody labeled yet is likeliest.

    The allowed samples are clustered as in ``cold_start`` (``len(labeled_x) +
    OVERCLUSTER * n`` clusters); the score is the cosine distance to the nearest labeled
    example or earlier pick.
    """
    rows, clusters = _clusters(x, allowed, n, len(labeled_x), seed)
    n = min(n, len(rows))
    if n == 0:
        return Ranked(np.zeros(0, np.int64), np.zeros(0), [], "discovery")
    typical = np.array([rows[local] for local, _, _ in clusters], np.int64)
    sizes = [len(members) for _, members, _ in clusters]
    tx = x[typical].astype(np.float32)
    nearest = np.full(len(typical), 2.0, np.float32)
    if len(labeled_x):
        nearest = (1.0 - tx @ labeled_x.astype(np.float32).T).min(axis=1)
    chosen, score = [], []
    taken = np.zeros(len(typical), bool)
    for _ in range(n):
        best = int(np.argmax(np.where(taken, -np.inf, nearest)))
        taken[best] = True
        chosen.append(best)
        score.append(float(nearest[best]))
        nearest = np.minimum(nearest, 1.0 - tx @ tx[best])
    reason = [
        f"far from every labeled example (distance {d:.2f}): typical of a cluster of "
        f"{sizes[c]} samples; the FM's labels of the labeled examples are no better than "
        "chance, so they do not lead the search"
        for c, d in zip(chosen, score, strict=True)
    ]
    return Ranked(typical[chosen], np.asarray(score), reason, "discovery")


def discover(space, n: int, allowed: np.ndarray, seed: int) -> Ranked:
    """Up to ``n`` picks looking for the classes no labeled example has (module docstring):
    the FM's most confident sample of each, the most frequent FM classes first, when it is
    shown above chance on the labeled examples; else ``far_typical``."""
    counts = np.bincount(space.labeled_y, minlength=len(space.classes))
    missing = np.flatnonzero(counts == 0)
    if fm_shown_above_chance(space.labeled_probs, space.labeled_y):
        predicted = np.bincount(space.fm_probs.argmax(axis=1), minlength=len(space.classes))
        wanted = missing[np.argsort(-predicted[missing], kind="stable")][:n]
        return fm_confident(space.fm_probs, wanted, allowed=allowed, classes=space.classes)
    return far_typical(
        space.x, min(n, len(missing)), allowed=allowed, labeled_x=space.labeled_x, seed=seed
    )


def committee_scores(members: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncertainty and disagreement of a committee of probability sets [N, C].

    Returns:
        (score [N] in [0, 1], top-2 margin [N] of the mean, normalised JS divergence [N]).
    """
    stack = np.stack([np.asarray(p, np.float64) for p in members.values()])
    mean = stack.mean(axis=0)
    top2 = np.sort(mean, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    if len(stack) < 2:
        return 1.0 - margin, margin, np.zeros(len(mean))

    def entropy(p):
        return -np.sum(p * np.log(np.maximum(p, 1e-12)), axis=-1)

    js = (entropy(mean) - entropy(stack).mean(axis=0)) / np.log(len(stack))
    js = np.clip(js, 0.0, 1.0)
    return 0.5 * (1.0 - margin) + 0.5 * js, margin, js


def uncertain_diverse(
    x: np.ndarray,
    members: dict[str, np.ndarray],
    n: int,
    *,
    allowed: np.ndarray | None = None,
    labeled_x: np.ndarray | None = None,
    candidates: int = 5,
    classes: list[str] | None = None,
) -> Ranked:
    """Uncertain or disputed samples, kept diverse (see the module docstring).

    Args:
        x: float32 [N, D] unit feature rows.
        members: name ("FM", "few-shot adapter", "student") -> probabilities [N, C].
        n: how many to pick.
        allowed: bool [N], samples that may be picked.
        labeled_x: [L, D] unit rows of the labeled examples (distance to them counts).
        candidates: the diversity pass looks at the n x candidates best scores.
        classes: class names for the reasons.
    """
    num = len(x)
    allowed = np.ones(num, bool) if allowed is None else allowed
    score, margin, _ = committee_scores(members)
    pool = np.flatnonzero(allowed)
    # Stable order on ties: by score, then by row.
    pool = pool[np.argsort(-score[pool], kind="stable")][: n * candidates]
    cx = x[pool].astype(np.float32)
    nearest = np.full(len(pool), np.inf)
    if labeled_x is not None and len(labeled_x):
        for start in range(0, len(labeled_x), 4096):
            block = labeled_x[start : start + 4096].astype(np.float32)
            nearest = np.minimum(nearest, (1.0 - cx @ block.T).min(axis=1))
    radius = _typical_spacing(cx)
    chosen: list[int] = []
    alive = np.ones(len(pool), bool)
    for _ in range(min(n, len(pool))):
        spread = np.minimum(1.0, np.maximum(nearest, 0.0) / radius) if radius > 0 else 1.0
        value = np.where(alive, score[pool] * spread, -np.inf)
        best = int(np.argmax(value))
        chosen.append(best)
        alive[best] = False
        nearest = np.minimum(nearest, 1.0 - cx @ cx[best])
    index = pool[chosen]
    names = classes or [str(c) for c in range(next(iter(members.values())).shape[1])]
    reasons = [_reason(members, int(i), margin[i], names) for i in index]
    return Ranked(index.astype(np.int64), score[index], reasons, "uncertainty")


def _typical_spacing(cx: np.ndarray, sample: int = 512) -> float:
    """Median cosine distance between two candidates (of the first ``sample``): a pick
    this far from everything known counts fully, a near-duplicate hardly at all."""
    if len(cx) < 2:
        return 0.0
    part = cx[:sample]
    distance = 1.0 - part @ part.T
    return float(np.median(distance[np.triu_indices(len(part), k=1)]))


def _reason(members: dict[str, np.ndarray], i: int, margin: float, names: list[str]) -> str:
    guesses = {name: int(np.argmax(p[i])) for name, p in members.items()}
    if len(set(guesses.values())) > 1:
        parts = [
            f"{name} says {names[g]} (p={members[name][i, g]:.2f})" for name, g in guesses.items()
        ]
        return "disagree: " + ", ".join(parts)
    mean = np.mean([p[i] for p in members.values()], axis=0)
    first, second = np.argsort(-mean, kind="stable")[:2]
    return f"uncertain: {names[first]} vs {names[second]} (margin {margin:.2f})"


# ------------------------------------------------------------------------ the command


def exclude_ids(value: str | Path | None) -> tuple[str, ...]:
    """Ids to exclude from a comma list, a file of one id per line, or a CSV with an ``id``
    column (a previous suggestions file)."""
    if value is None or value == "":
        return ()
    path = Path(value)
    if not path.is_file():
        if "/" in str(value) or path.suffix.lower() in (".csv", ".jsonl", ".txt"):
            raise UserError(f"--exclude {value}: no such file; give a file or a comma list of ids")
        return tuple(part.strip() for part in str(value).split(",") if part.strip())
    if path.suffix.lower() == ".csv":
        columns = _read_csv(path)
        if "id" not in columns:
            raise UserError(f"--exclude {path} has no 'id' column; give a table of ids")
        return tuple(v.strip() for v in columns["id"] if v and v.strip())
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def run_suggest(config: SuggestConfig) -> dict:
    """Rank the data's samples to label next and write them to ``config.out``.

    Returns:
        Summary: ``out``, ``mode``, ``rows`` (the written rows as dicts), ``excluded``,
        ``unknown_excluded`` (ids not in the data), ``space``, ``lines``.
    """
    from zmdevice.curation.fm_space import settings_space, student_probs

    suffix = ".csv" if config.format == "csv" else ".json"
    out = Path(config.out or f"suggestions{suffix}")
    excluded = tuple(i for value in config.exclude or () for i in exclude_ids(value))
    check_writable(out, "--out", suffix=suffix)
    space = settings_space(config)
    dataset, classes = space.dataset, space.classes
    allowed = np.ones(len(dataset), bool)
    position = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    unknown = [i for i in excluded if i not in position]
    for sample_id in excluded:
        if sample_id in position:
            allowed[position[sample_id]] = False
    if space.labeled is not None:
        allowed[space.labeled_row[space.labeled_row >= 0]] = False
    if not allowed.any():
        raise UserError(f"every sample of {config.data} is labeled or excluded: nothing to suggest")
    counts = np.zeros(len(classes), np.int64)
    if space.labeled is not None:
        counts = np.bincount(space.labeled_y, minlength=len(classes))
    student = None
    if config.student is not None:
        student = student_probs(
            config.student, dataset, classes, device=config.device, batch_size=config.batch_size
        )
    cold = student is None and counts.sum() < config.cold_start_per_class * len(classes)
    ranked = rank(space, config, allowed, counts, student, cold)
    rows = suggestion_rows(space, ranked, student, config.image_url_prefix)
    if config.format == "csv":
        write_suggestions_csv(rows, out, dataset.modality)
    else:
        from zmdevice.curation.label_studio import make_tasks, write_json

        model_version = f"zmdevice FM {space.spec}"
        write_json(out, make_tasks(rows, dataset.modality, model_version))
    lines = [
        f"wrote {out}: {len(rows)} samples to label ({ranked.mode}; "
        f"{int((~allowed).sum())} labeled or excluded, FM {space.kind} of {space.spec})",
    ]
    looking = sum(reason.startswith(DISCOVERY_REASONS) for reason in ranked.reason)
    if looking:
        missing = int((counts == 0).sum())
        lines.append(
            f"  {looking} of them look for the {missing} classes without a labeled example"
        )
    if unknown:
        lines.append(
            f"  note: {len(unknown)} excluded ids are not in {config.data}: {listing(unknown, 5)}"
        )
    if ranked.mode == "cold start":
        covered = sorted({r["fm_guess"] for r in rows})
        lines.append(f"  covers the FM classes {listing(covered)}")
    return {
        "out": str(out),
        "mode": ranked.mode,
        "rows": rows,
        "excluded": int((~allowed).sum()),
        "discovery": looking,
        "unknown_excluded": unknown,
        "space": space.kind,
        "lines": lines,
    }


DISCOVERY_REASONS = ("no labeled example of", "far from every labeled example")
"""How the reasons of ``discover``'s picks begin."""


def rank(space, config: SuggestConfig, allowed, counts, student, cold: bool) -> Ranked:
    """The round's picks (module docstring): the search for classes without a labeled
    example first, then the cold start or the committee's uncertain samples."""
    has_labels = space.labeled is not None and counts.sum() > 0
    if cold and has_labels and not fm_shown_above_chance(space.labeled_probs, space.labeled_y):
        found = far_typical(
            space.x, config.n, allowed=allowed, labeled_x=space.labeled_x, seed=config.seed
        )
        return Ranked(found.index, found.score, found.reason, "cold start, far from the labels")
    found = Ranked(np.zeros(0, np.int64), np.zeros(0), [], "discovery")
    if has_labels and (counts == 0).any():
        found = discover(space, math.ceil(DISCOVERY_SHARE * config.n), allowed, config.seed)
    free = allowed.copy()
    free[found.index] = False
    known_x = space.labeled_x
    if len(found.index):  # the rest keep their distance from these picks too
        known_x = np.concatenate([space.labeled_x, space.x[found.index]])
    rest = config.n - len(found.index)
    if cold:
        ranked = cold_start(
            space.x, space.fm_probs, rest, allowed=free, labeled_counts=counts,
            labeled_x=known_x, classes=space.classes, seed=config.seed,
        )  # fmt: skip
    else:
        members = {"FM": space.fm_probs}
        if space.labeled is not None and len(set(space.labeled_y.tolist())) >= 2:
            from zmdevice.fewshot import fit_adapter

            adapter = fit_adapter(space.labeled_x, space.labeled_y, len(space.classes))
            members["few-shot adapter"] = adapter.probs(space.x, space.fm_probs)
        if student is not None:
            members["student"] = student
        ranked = uncertain_diverse(
            space.x, members, rest, allowed=free, labeled_x=known_x,
            candidates=config.candidates, classes=space.classes,
        )  # fmt: skip
    return Ranked(
        np.concatenate([found.index, ranked.index]).astype(np.int64),
        np.concatenate([found.score, ranked.score]),
        found.reason + ranked.reason,
        ranked.mode,
    )


def suggestion_rows(space, ranked: Ranked, student, image_url_prefix: str = "") -> list[dict]:
    """The output rows (id, text or path, guesses, score, reason, empty label); images
    also get ``image``: ``image_url_prefix`` + the path relative to the data folder."""
    from urllib.parse import quote

    dataset, classes = space.dataset, space.classes
    rows = []
    for i, score, reason in zip(ranked.index, ranked.score, ranked.reason, strict=True):
        i = int(i)
        guess = int(np.argmax(space.fm_probs[i]))
        row = {"id": dataset.ids[i]}
        if dataset.modality == "text":
            row["text"] = dataset.texts[i]
        else:
            row["path"] = str(Path(dataset.paths[i]).absolute())
            row["image"] = image_url_prefix + quote(dataset.relative_paths[i])
        row.update(
            fm_guess=classes[guess],
            fm_confidence=round(float(space.fm_probs[i, guess]), 4),
            student_guess="" if student is None else classes[int(np.argmax(student[i]))],
            score=round(float(score), 4),
            reason=reason,
            label="",
        )
        rows.append(row)
    return rows


CSV_COLUMNS = ("id", "CONTENT", "fm_guess", "student_guess", "score", "reason", "label")


def write_suggestions_csv(rows: list[dict], out, modality: str) -> Path:
    """The suggestions as CSV, atomically (``label_studio.write_rows_csv``)."""
    from zmdevice.curation.label_studio import write_rows_csv

    return write_rows_csv(rows, out, CSV_COLUMNS, modality)


def filled_suggestions(path: str | Path, out: str | Path) -> dict:
    """Write the rows of a suggestions CSV whose ``label`` is filled in to ``out`` (a
    ``--labeled`` table: the reader refuses empty labels), and say how many were left.

    Returns:
        ``{"out", "kept", "left_empty", "lines"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suggestions file not found: {path}; check the path")
    columns = _read_csv(path)
    for needed in ("id", "label"):
        if needed not in columns:
            raise UserError(f"{path} has no '{needed}' column; give a `zmdevice suggest` CSV")
    content = "text" if "text" in columns else "path"
    if content not in columns:
        raise UserError(f"{path} has neither a 'text' nor a 'path' column")
    keep = [i for i, v in enumerate(columns["label"]) if v is not None and str(v).strip()]
    if not keep:
        raise UserError(f"{path} has no filled-in label yet: fill the 'label' column")
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", content, "label"])
        for i in keep:
            value = columns[content][i]
            if content == "path":
                from zmdevice.curation.label_studio import relative_to

                value = relative_to(path.parent / value, out.parent)
            writer.writerow([columns["id"][i], value, str(columns["label"][i]).strip()])
    left = len(columns["label"]) - len(keep)
    lines = [f"wrote {out}: {len(keep)} labeled rows of {path} ({left} left empty)"]
    return {"out": str(out), "kept": len(keep), "left_empty": left, "lines": lines}


def _read_csv(path: Path) -> dict[str, list[str]]:
    """A CSV of ours (suggestions, id lists) as column -> cells."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, strict=True)
            rows = list(reader)
            names = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a UTF-8 CSV file ({error})") from None
    return {name.strip(): [row.get(name) for row in rows] for name in names}
