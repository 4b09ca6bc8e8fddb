"""Which labels ``zmdevice label`` writes, decided per run from the user's labeled examples.

With labeled examples (``--few-shot``) there are four ways to turn the FM into labels:

- ``zero-shot``: the FM's own probabilities (the paper's protocol);
- ``few-shot``: a probe on the FM's features times its zero-shot probabilities
  (``zmdevice.fewshot``);
- ``refined``: label spreading over the data's neighbour graph from the labeled examples,
  with the few-shot probabilities as the prior of every other sample (``zmdevice.refine``);
- ``refined-no-prior``: the same spreading from the labeled examples alone.

Which one is best depends on the FM and the data: a strong FM's prior helps the spreading,
a weak one's outvotes the labeled examples, and on some data the graph helps not at all. A
threshold fixed on a few benchmark sets does not transfer (one fitted to 8-10 classes dropped
a 15-class FM right 4x as often as chance), so each candidate is scored by stratified
cross-validation on the labeled examples: each fold's examples are held out, every candidate
is rebuilt from the other folds only, and scored on the held-out examples (no example
predicts itself). The spreading's graph holds the data and all labeled examples, held-out
ones as unclamped nodes, exactly as the data's samples are when the labels are written.

A held-out example is scored only when its class keeps a labeled example in the other folds:
without one no candidate but zero-shot can name its class, and the comparison would say
nothing about the labels the full set makes. With one example per class no example can be
scored; then the choice is the refinement, with the prior kept when the FM's zero-shot
labels of the examples are right more often than chance would make them (a one-sided
binomial test at ``PRIOR_SIGNIFICANCE``), a rule that scales with the class count.

Dropping the prior needs more than a higher score when the FM has shown it knows something:
with 4 examples per class the two refined sources differ on a handful of held-out examples,
and a plain comparison dropped the prior of FMs right 3-10x as often as chance on draws
where keeping it gave labels 3-4 points better. So when the FM's zero-shot labels of the
examples are above chance (the binomial test below), ``refined-no-prior`` replaces
``refined`` only if it wins significantly on the held-out examples the two disagree on (a
one-sided sign test at ``PRIOR_SIGNIFICANCE``). An FM not shown above chance has no such
claim, and the scores decide as they are (an ImageNet FM on digits, 10% right: dropping its
prior is worth 6 points there).

Ties go to the earlier entry of ``CANDIDATES``. By default the choice is among the refined
sources only (``DEFAULT_SOURCES``: the benchmark's dev evidence), the others scored alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmdevice.metrics import binomial_tail

CANDIDATES = ("refined", "few-shot", "refined-no-prior", "zero-shot")
"""Every label source, in the order that breaks ties."""
REFINED = ("refined", "refined-no-prior")
DEFAULT_SOURCES = REFINED
"""What ``label --few-shot`` chooses among. Chosen on the dev splits of the benchmark's ten
data sets (4 to 60 classes, FMs 10-75% right zero-shot; 60 labeled draws;
``benchmarks/LABEL_SOURCE.md``), by the mean dev accuracy of the chosen labels: over all
four sources 59.6%, over the refined two and zero-shot 59.7, over the refined two 59.9 (the
previous fixed rule 56.5, the best source of each draw in hindsight 60.7); the refined two
won again with each data set left out in turn. Cross-validation on 4 examples per class picks
the few-shot labels by noise more often than they are best. All four are
still scored and recorded; ``--no-refine`` forces the few-shot labels."""
MAX_FOLDS = 5
"""Most folds; fewer when a class has fewer examples (at least 2 per class: 2 folds)."""
PRIOR_SIGNIFICANCE = 0.05
"""The level of both tests of the prior (module doc): the binomial test of the FM against
chance, and the sign test that must support dropping the prior of an FM above chance.
Checked on the pools of six benchmark data sets (``benchmarks/LABEL_SOURCE_DRAWS.md``, 8
labeled draws of 2-4 per class each, mean pool accuracy): plain cross-validation 61.26%,
this rule 61.42 (text at 4 per class: 80.7 -> 84.1; images -0.4 to +0.7; the others
equal), the best cell of a grid of both levels 61.46 (the FM's at 0.1), always keeping the
prior 60.35. One level for both tests: the grid's differences are inside the draws'
noise."""
FALLBACK_WITH_PRIOR = ("refined", "few-shot", "refined-no-prior", "zero-shot")
"""The choice, first allowed entry, with one example per class and an FM above chance."""
FALLBACK_WITHOUT_PRIOR = ("refined-no-prior", "few-shot", "refined", "zero-shot")
"""...and with an FM no better than chance on the examples."""


@dataclass(frozen=True)
class Evidence:
    """What the labels are decided from: the data's and the labeled examples' FM outputs."""

    features: np.ndarray | None
    """float [N, D] FM features of the data (None: no refinement possible)."""
    probs: np.ndarray | None
    """float [N, C] zero-shot probabilities of the data (None with ``features``)."""
    labeled_features: np.ndarray
    """float [L, D] FM features of the labeled examples."""
    labeled_classes: np.ndarray
    """int [L] class ids of the labeled examples."""
    labeled_probs: np.ndarray
    """float [L, C] zero-shot probabilities of the labeled examples."""

    @property
    def num_classes(self) -> int:
        return self.labeled_probs.shape[1]


def stratified_folds(classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fold id per labeled example (``deal_folds``) over ``min(MAX_FOLDS, largest
    class)`` folds (at least 2)."""
    classes = np.asarray(classes)
    return deal_folds(classes, min(MAX_FOLDS, max(2, int(np.bincount(classes).max()))), seed)


def deal_folds(classes: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """int64 [L] fold of each example: each class's examples, shuffled, dealt round-robin
    over ``folds`` folds."""
    classes = np.asarray(classes)
    fold = np.zeros(len(classes), dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Each class starts dealing where the last one stopped, so small classes fill all folds.
    start = 0
    for label in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == label))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return fold


def predict_candidates(
    evidence: Evidence, train: np.ndarray, graph=None, names=CANDIDATES
) -> dict[str, np.ndarray]:
    """Each candidate's probabilities for the labeled examples not in ``train``, built from
    the examples in ``train`` (a boolean mask [L]) only.

    Returns:
        name -> float [L - train.sum(), C], rows in the order of the held-out examples.
    """
    from zmdevice.fewshot import fit_adapter
    from zmdevice.refine import spread

    held = ~train
    e = evidence
    out: dict[str, np.ndarray] = {}
    if "zero-shot" in names:
        out["zero-shot"] = np.asarray(e.labeled_probs[held], dtype=np.float32)
    adapter = None
    if {"few-shot", "refined"} & set(names):
        adapter = fit_adapter(e.labeled_features[train], e.labeled_classes[train], e.num_classes)
    if "few-shot" in names:
        out["few-shot"] = adapter.probs(e.labeled_features[held], e.labeled_probs[held])
    for name in [n for n in REFINED if n in names]:
        seeds = refinement_seeds(evidence, train, adapter if name == "refined" else None)
        out[name] = spread(graph, seeds)[len(e.features) :][held].astype(np.float32)
    return out


def refinement_seeds(evidence: Evidence, train: np.ndarray, adapter) -> np.ndarray:
    """The spreading's seeds [N + L, C]: the prior (``adapter``'s probabilities; zeros
    without one) on the data and on the labeled examples outside ``train``, the examples in
    ``train`` one-hot, scaled so that every class seeds the same mass (class mass
    normalisation, ``fewshot.class_balance``)."""
    from zmdevice.fewshot import class_balance

    e = evidence
    count, classes = e.probs.shape
    seeds = np.zeros((count + len(e.labeled_classes), classes), dtype=np.float32)
    if adapter is not None:
        seeds[:count] = adapter.probs(e.features, e.probs)
        held = np.flatnonzero(~train)
        seeds[count + held] = adapter.probs(e.labeled_features[held], e.labeled_probs[held])
    kept = np.flatnonzero(train)
    seeds[count + kept] = np.eye(classes, dtype=np.float32)[e.labeled_classes[kept]]
    balance = class_balance(e.labeled_classes[kept], classes)
    if balance is not None:  # each class spreads the same seed mass
        seeds[count + kept] *= balance[e.labeled_classes[kept], None].astype(np.float32)
    return seeds


def cross_validate(evidence: Evidence, names=CANDIDATES, graph=None, seed: int = 0) -> dict:
    """Score ``names`` by stratified cross-validation on the labeled examples.

    Returns:
        {"folds", "scored" (held-out examples whose class kept a training example),
        "candidates": name -> {"accuracy", "spread" (std over folds), "right"}, and with both
        refined sources scored "prior_test" (``sign_test``: refined-no-prior vs refined)};
        accuracy is None when no example could be scored.
    """
    e = evidence
    fold = stratified_folds(e.labeled_classes, seed)
    right = {name: [] for name in names}
    per_fold = {name: [] for name in names}
    scored = 0
    for k in range(int(fold.max()) + 1):
        train = fold != k
        held = np.flatnonzero(~train)
        represented = np.isin(e.labeled_classes[held], e.labeled_classes[train])
        if not represented.any():
            continue
        truth = e.labeled_classes[held][represented]
        scored += len(truth)
        for name, probs in predict_candidates(e, train, graph, names).items():
            hits = probs[represented].argmax(axis=1) == truth
            right[name] += hits.tolist()
            per_fold[name].append(float(hits.mean()))
    candidates = {}
    for name in names:
        accuracy = float(np.mean(right[name])) if right[name] else None
        candidates[name] = {
            "accuracy": None if accuracy is None else round(accuracy, 4),
            "spread": round(float(np.std(per_fold[name])), 4) if per_fold[name] else None,
            "right": int(np.sum(right[name])),
        }
    result = {"folds": int(fold.max()) + 1, "scored": scored, "candidates": candidates}
    if set(REFINED) <= set(names) and scored:
        result["prior_test"] = sign_test(right["refined-no-prior"], right["refined"])
    return result


def sign_test(hits: list, rival_hits: list) -> dict:
    """Does ``hits`` beat ``rival_hits`` (right / wrong per held-out example, the same
    examples) by more than chance? One-sided sign test on the examples they disagree on.

    Returns:
        {"wins", "losses" (examples only one of the two got right), "p_value": the chance of
        at least ``wins`` of ``wins + losses`` fair coin flips}.
    """
    hits, rival_hits = np.asarray(hits, dtype=bool), np.asarray(rival_hits, dtype=bool)
    wins, losses = int((hits & ~rival_hits).sum()), int((rival_hits & ~hits).sum())
    p_value = binomial_tail(wins, wins + losses, 0.5)
    return {"wins": wins, "losses": losses, "p_value": float(f"{p_value:.3g}")}


def above_chance(labeled_probs, labeled_classes) -> tuple[float, float]:
    """(the FM's zero-shot accuracy on the labeled examples, the one-sided binomial p-value
    of getting at least that many right by chance, 1 / C)."""
    labeled_classes = np.asarray(labeled_classes)
    right = int((np.asarray(labeled_probs).argmax(axis=1) == labeled_classes).sum())
    count, chance = len(labeled_classes), 1.0 / np.asarray(labeled_probs).shape[1]
    p_value = binomial_tail(right, count, chance)
    return right / max(count, 1), min(1.0, p_value)


def data_graph(evidence: Evidence):
    """The neighbour graph over the data and every labeled example (``refine.knn_graph``)."""
    from zmdevice.refine import knn_graph

    return knn_graph(np.concatenate([evidence.features, evidence.labeled_features]))


def choose(evidence: Evidence, allowed=DEFAULT_SOURCES, graph=None, seed: int = 0) -> dict:
    """Decide the label source among ``allowed`` (a subset of ``CANDIDATES``).

    Every source the evidence can build is scored (the refined ones need the data's
    features), so the record shows what the others would have scored too.

    Returns:
        The decision for the file's metadata: {"chosen", "how" ("cross-validation",
        "binomial test", "only candidate"), "allowed" (refined-no-prior left out when a class
        has no labeled example), "classes_without_examples", cross-validation's "folds", "scored"
        and "candidates" (every source scored), "prior_test" (``sign_test`` of
        refined-no-prior against refined on the held-out examples; "needed": True where it
        decided), and the FM's "zero_shot_accuracy_on_labeled" with its "p_value"}.
    """
    names = [name for name in CANDIDATES if name in allowed]
    unseen = np.bincount(evidence.labeled_classes, minlength=evidence.num_classes) == 0
    if unseen.any() and len(names) > 1 and "refined-no-prior" in names:
        # Spreading the examples alone cannot name a class none of them has.
        names.remove("refined-no-prior")
    accuracy, p_value = above_chance(evidence.labeled_probs, evidence.labeled_classes)
    decision = {
        "allowed": names,
        "classes_without_examples": int(unseen.sum()),
        "zero_shot_accuracy_on_labeled": round(accuracy, 4),
        "p_value": float(f"{p_value:.3g}"),
    }
    if evidence.features is None and set(names) & set(REFINED):
        raise ValueError("refined candidates need the data's features")
    scored = [n for n in CANDIDATES if evidence.features is not None or n not in REFINED]
    if graph is None and evidence.features is not None:
        graph = data_graph(evidence)
    decision.update(cross_validate(evidence, scored, graph, seed))
    if len(names) == 1:
        return dict(decision, chosen=names[0], how="only candidate")
    scores = {n: decision["candidates"][n]["accuracy"] for n in names}
    if any(score is not None for score in scores.values()):
        best = max(names, key=lambda n: (scores[n], -names.index(n)))
        if best == "refined-no-prior" and "refined" in names and p_value < PRIOR_SIGNIFICANCE:
            # An FM above chance keeps its prior unless dropping it wins significantly.
            decision["prior_test"]["needed"] = True
            if decision["prior_test"]["p_value"] >= PRIOR_SIGNIFICANCE:
                best = "refined"
        return dict(decision, chosen=best, how="cross-validation")
    # One example per class: nothing to score (module docstring).
    order = FALLBACK_WITH_PRIOR if p_value < PRIOR_SIGNIFICANCE else FALLBACK_WITHOUT_PRIOR
    chosen = next(name for name in order if name in names)
    return dict(decision, chosen=chosen, how="binomial test")


def make_labels(
    source: str, evidence: Evidence, class_prior=None, graph=None
) -> tuple[np.ndarray, dict]:
    """The data's labels float32 [N, C] from ``source`` with every labeled example, and what
    was done (for the file's metadata: the refinement's info for the refined sources).

    ``class_prior``: class shares [C] refined labels are rebalanced to (``refine.rebalance``).
    """
    from zmdevice.fewshot import fit_adapter
    from zmdevice.refine import spread, with_class_prior

    e = evidence
    if source == "zero-shot":
        return np.asarray(e.probs, dtype=np.float32), {}
    adapter = fit_adapter(e.labeled_features, e.labeled_classes, e.num_classes)
    if source == "few-shot":
        return adapter.probs(e.features, e.probs), {}
    every = np.ones(len(e.labeled_classes), dtype=bool)
    seeds = refinement_seeds(e, every, adapter if source == "refined" else None)
    graph = data_graph(evidence) if graph is None else graph
    refined = spread(graph, seeds)[: len(e.features)]
    info = {"prior_weight": 1.0 if source == "refined" else 0.0, "labeled": len(every)}
    return with_class_prior(refined, class_prior, info)


def decision_line(decision: dict) -> str:
    """The label source and why, in one line for the label command's summary."""
    chosen, how = decision["chosen"], decision["how"]
    unseen = decision.get("classes_without_examples", 0)
    if how == "only candidate":
        if unseen and chosen == "refined" and "refined-no-prior" not in decision["allowed"]:
            return (
                f"labels: refined ({unseen} class(es) without a labeled example: spreading the "
                "examples alone cannot name them, so the FM's prior stays)"
            )
        return f"labels: {chosen} (forced)"
    if how == "binomial test":
        verdict = "above" if decision["p_value"] < PRIOR_SIGNIFICANCE else "not above"
        return (
            f"labels: {chosen} (one labeled example per class: nothing to cross-validate; the "
            f"FM's zero-shot labels of the examples, right on "
            f"{decision['zero_shot_accuracy_on_labeled']:.0%}, are {verdict} chance, "
            f"p = {decision['p_value']:.2g})"
        )

    def scores(allowed: bool) -> str:
        ranked = sorted(decision["candidates"].items(), key=lambda item: -item[1]["accuracy"])
        return ", ".join(
            f"{name} {100 * c['accuracy']:.1f}% ±{100 * c['spread']:.1f}"
            for name, c in ranked
            if (name in decision["allowed"]) == allowed
        )

    others = scores(False)
    line = (
        f"labels: {chosen}, by {decision['folds']}-fold cross-validation on "
        f"{decision['scored']} labeled examples ({scores(True)}"
        + (f"; not candidates: {others})" if others else ")")
    )
    test = decision.get("prior_test", {})
    if test.get("needed"):
        verdict = "dropped" if chosen == "refined-no-prior" else "kept"
        line += (
            f"; the FM is above chance on them (p = {decision['p_value']:.2g}), so its prior is "
            f"{verdict}: dropping it fixes {test['wins']} held-out examples and breaks "
            f"{test['losses']} (sign test p = {test['p_value']:.2g})"
        )
    return line
