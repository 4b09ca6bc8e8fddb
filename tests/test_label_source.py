"""zmdevice.label_source: the labels to write, chosen by cross-validation on the labeled
examples, with no example predicting itself."""

import numpy as np
import pytest
import torch
from helpers import clusters, noisy_prior

from zmdevice.label_source import (
    CANDIDATES,
    DEFAULT_SOURCES,
    Evidence,
    above_chance,
    choose,
    cross_validate,
    data_graph,
    decision_line,
    make_labels,
    sign_test,
    stratified_folds,
)

torch.set_num_threads(1)


def teacher_probs(rng, labels, classes=4, correct=0.9):
    """An FM right on about ``correct`` of the samples, else a random class."""
    return noisy_prior(rng, labels, classes, correct, top=0.7)


def evidence(rng, per_class=4, fm_correct=0.9, features_informative=True, classes=4):
    data, truth = clusters(rng, 30, classes)
    labeled_features, labeled = clusters(rng, per_class, classes)
    if not features_informative:  # the FM's feature space knows nothing of the classes
        data = rng.standard_normal(data.shape)
        labeled_features = rng.standard_normal(labeled_features.shape)
    return (
        Evidence(
            data,
            teacher_probs(rng, truth, classes, fm_correct),
            labeled_features,
            labeled,
            teacher_probs(rng, labeled, classes, fm_correct),
        ),
        truth,
    )


def test_folds_are_stratified_deterministic_and_cover_every_example():
    classes = np.repeat(np.arange(3), [4, 4, 2])
    fold = stratified_folds(classes, seed=0)
    assert fold.max() == 3  # min(5 folds, the largest class)
    for k in range(4):
        # Each class with 4 examples has exactly one in each fold.
        assert np.bincount(classes[fold == k], minlength=3)[:2].tolist() == [1, 1]
    np.testing.assert_array_equal(fold, stratified_folds(classes, seed=0))
    assert not np.array_equal(fold, stratified_folds(classes, seed=1))
    assert stratified_folds(np.repeat(np.arange(2), 12)).max() == 4  # at most 5 folds


def test_no_labeled_example_predicts_itself():
    """Labels with no relation to the features: any leak of a held-out example's own label
    into its prediction (the refinement clamps training examples) would score near 100%."""
    rng = np.random.default_rng(0)
    e, _ = evidence(rng, per_class=6)
    shuffled = Evidence(
        e.features, e.probs, e.labeled_features, rng.permutation(e.labeled_classes), e.probs[:24]
    )
    result = cross_validate(shuffled, graph=data_graph(shuffled))
    assert result["scored"] == 24
    for name in ("few-shot", "refined", "refined-no-prior"):
        assert result["candidates"][name]["accuracy"] < 0.6, name


def test_a_strong_fm_in_a_feature_space_that_knows_nothing_keeps_its_zero_shot_labels():
    rng = np.random.default_rng(1)
    e, truth = evidence(rng, fm_correct=0.95, features_informative=False)
    decision = choose(e, allowed=CANDIDATES)
    assert decision["how"] == "cross-validation" and decision["chosen"] == "zero-shot"
    labels, _ = make_labels(decision["chosen"], e)
    assert (labels.argmax(1) == truth).mean() > 0.85


def test_a_useless_fm_with_a_good_feature_space_is_outvoted_by_the_examples():
    rng = np.random.default_rng(2)
    e, truth = evidence(rng, fm_correct=0.0)  # the FM guesses at random
    decision = choose(e, allowed=CANDIDATES)
    scores = {n: c["accuracy"] for n, c in decision["candidates"].items()}
    assert decision["chosen"] != "zero-shot" and scores["zero-shot"] < 0.6
    assert scores[decision["chosen"]] == max(scores.values())
    labels, _ = make_labels(decision["chosen"], e)
    assert (labels.argmax(1) == truth).mean() > 0.9
    line = decision_line(decision)
    assert line.startswith(f"labels: {decision['chosen']}, by 4-fold cross-validation on 16")


def test_ties_go_to_the_earlier_candidate():
    rng = np.random.default_rng(3)
    e, _ = evidence(rng, fm_correct=1.0)  # every candidate right on every example
    decision = choose(e, allowed=CANDIDATES)
    assert {c["accuracy"] for c in decision["candidates"].values()} == {1.0}
    assert decision["chosen"] == CANDIDATES[0]
    assert choose(e, allowed=("zero-shot", "few-shot"))["chosen"] == "few-shot"
    forced = choose(e, allowed=("zero-shot",))
    assert forced["chosen"] == "zero-shot" and forced["how"] == "only candidate"


@pytest.mark.parametrize(
    ("right", "classes", "kept"),
    [
        # 15 classes, the FM right on 17 of 60 examples (28%, 4x chance): a weak FM whose
        # prior still carries information, dropped by a fixed 50% threshold.
        (17, 15, True),
        (6, 15, False),  # 10%: chance is 6.7%
        (3, 10, False),  # 30% of 10 examples: possible by chance (p = 0.07)
        (5, 10, True),
    ],
)
def test_with_one_example_per_class_the_prior_follows_a_binomial_test(right, classes, kept):
    count = 60 if classes == 15 else 10
    labeled = np.arange(count) % classes
    guess = np.where(np.arange(count) < right, labeled, (labeled + 1) % classes)
    probs = np.eye(classes, dtype=np.float32)[guess]
    accuracy, p_value = above_chance(probs, labeled)
    assert accuracy == pytest.approx(right / count) and (p_value < 0.05) == kept
    if count == classes:  # one example per class: cross-validation has nothing to score
        rng = np.random.default_rng(4)
        e = Evidence(
            rng.standard_normal((50, 6)),
            np.full((50, classes), 1 / classes, np.float32),
            rng.standard_normal((count, 6)),
            labeled,
            probs,
        )
        decision = choose(e)
        assert decision["scored"] == 0 and decision["how"] == "binomial test"
        assert decision["chosen"] == ("refined" if kept else "refined-no-prior")
        assert ("are above chance" if kept else "not above chance") in decision_line(decision)


def test_by_default_the_choice_is_among_the_refined_sources_with_all_scored():
    rng = np.random.default_rng(6)
    e, _ = evidence(rng, fm_correct=0.95, features_informative=False)
    decision = choose(e)
    assert decision["allowed"] == list(DEFAULT_SOURCES) == ["refined", "refined-no-prior"]
    assert decision["chosen"] in DEFAULT_SOURCES and sorted(decision["candidates"]) == sorted(
        CANDIDATES
    )
    line = decision_line(decision)
    assert "; not candidates: " in line and line.index("zero-shot") > line.index("not candidates")
    # Without the data's features only the unrefined sources can be scored.
    bare = Evidence(None, None, e.labeled_features, e.labeled_classes, e.labeled_probs)
    decision = choose(bare, allowed=("few-shot", "zero-shot"))
    assert sorted(decision["candidates"]) == ["few-shot", "zero-shot"]


def test_labels_rebalanced_to_a_class_prior_only_when_refined():
    rng = np.random.default_rng(5)
    e, _ = evidence(rng)
    balanced = [0.25] * 4
    refined, info = make_labels("refined", e, class_prior=balanced)
    assert refined.mean(0) == pytest.approx(balanced, abs=1e-2) and "class_prior" in info
    few_shot, info = make_labels("few-shot", e, class_prior=balanced)
    assert info == {}


def test_the_sign_test_counts_only_the_examples_the_two_disagree_on():
    assert sign_test([1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1]) == {
        "wins": 5, "losses": 0, "p_value": 0.0312}  # fmt: skip
    assert sign_test([1, 1, 1, 0, 0], [0, 0, 0, 1, 1])["p_value"] == 0.5  # 16 / 32
    assert sign_test([1, 0], [1, 0]) == {"wins": 0, "losses": 0, "p_value": 1.0}


def scored_pair(no_prior_hits, prior_hits):
    """A cross-validation result where only the two refined sources differ."""
    candidates = {
        name: {"accuracy": float(np.mean(hits)), "spread": 0.0, "right": int(np.sum(hits))}
        for name, hits in (("refined", prior_hits), ("refined-no-prior", no_prior_hits),
                           ("few-shot", prior_hits), ("zero-shot", prior_hits))
    }  # fmt: skip
    return {"folds": 4, "scored": len(prior_hits), "candidates": candidates,
            "prior_test": sign_test(no_prior_hits, prior_hits)}  # fmt: skip


@pytest.mark.parametrize(
    ("fm_right", "wins", "chosen"),
    [
        # 15 classes, 60 examples, the FM right on 17 (p ~ 1e-5): dropping its prior for 3
        # more held-out examples right of 60 is noise (3 vs 0: p = 0.125): kept.
        (17, 3, "refined"),
        (17, 8, "refined-no-prior"),  # 8 vs 0 (p = 0.004): dropped
        # The FM right on 4 of 60, chance 4 of 60: no claim, the higher score decides.
        (4, 3, "refined-no-prior"),
    ],
)
def test_an_fm_above_chance_keeps_its_prior_unless_dropping_it_wins_significantly(
    monkeypatch, fm_right, wins, chosen
):
    import zmdevice.label_source as label_source

    classes, count = 15, 60
    labeled = np.arange(count) % classes
    guess = np.where(np.arange(count) < fm_right, labeled, (labeled + 1) % classes)
    rng = np.random.default_rng(7)
    e = Evidence(
        rng.standard_normal((50, 6)), np.full((50, classes), 1 / classes, np.float32),
        rng.standard_normal((count, 6)), labeled, np.eye(classes, dtype=np.float32)[guess],
    )  # fmt: skip
    prior_hits = np.arange(count) < 30
    no_prior_hits = prior_hits | (np.arange(count) >= count - wins)
    fake = scored_pair(no_prior_hits, prior_hits)
    monkeypatch.setattr(label_source, "cross_validate", lambda *args, **kwargs: fake)
    decision = choose(e)
    assert decision["chosen"] == chosen and decision["how"] == "cross-validation"
    line = decision_line(decision)
    if fm_right > 4:
        assert decision["prior_test"]["needed"]
        verdict = "kept" if chosen == "refined" else "dropped"
        assert f"so its prior is {verdict}: dropping it fixes {wins} held-out" in line
    else:
        assert "needed" not in decision["prior_test"] and "sign test" not in line


def test_cross_validation_records_the_paired_test_of_the_prior():
    rng = np.random.default_rng(8)
    e, _ = evidence(rng, fm_correct=0.6)
    result = cross_validate(e, graph=data_graph(e))
    test, scores = result["prior_test"], result["candidates"]
    # The disagreements account exactly for the difference in examples right.
    assert test["wins"] - test["losses"] == (
        scores["refined-no-prior"]["right"] - scores["refined"]["right"]
    )
    assert 0 < test["p_value"] <= 1


def test_every_labeled_class_seeds_the_spreading_with_the_same_mass():
    from zmdevice.label_source import refinement_seeds

    rng = np.random.default_rng(9)
    e, _ = evidence(rng, per_class=4)
    keep = np.isin(np.arange(16), [0, 1, 2, 3, 4, 8])  # class 0: 4 examples, 1 and 2: 1, 3: 0
    seeds = refinement_seeds(e, keep, adapter=None)[len(e.features) :]
    mass = seeds.sum(axis=0)
    np.testing.assert_allclose(mass, [2.0, 2.0, 2.0, 0.0], rtol=1e-6)  # 6 seeds over 3 classes
    assert seeds[~keep].sum() == 0  # held-out examples carry no label (no prior here)
    balanced = refinement_seeds(e, np.ones(16, bool), adapter=None)[len(e.features) :]
    np.testing.assert_array_equal(balanced, np.eye(4, dtype=np.float32)[e.labeled_classes])


def test_without_an_example_of_some_class_the_prior_cannot_be_dropped():
    rng = np.random.default_rng(10)
    e, _ = evidence(rng, per_class=4)
    kept = e.labeled_classes != 3
    partial = Evidence(e.features, e.probs, e.labeled_features[kept], e.labeled_classes[kept],
                       e.labeled_probs[kept])  # fmt: skip
    decision = choose(partial)
    assert decision["classes_without_examples"] == 1
    assert decision["allowed"] == ["refined"] and decision["chosen"] == "refined"
    assert "refined-no-prior" in decision["candidates"]  # still scored, for the record
    assert decision_line(decision).startswith("labels: refined (1 class(es) without a labeled")
    assert choose(e)["classes_without_examples"] == 0


def test_the_binomial_tail_keeps_tiny_p_values_and_large_counts():
    from zmdevice.metrics import binomial_tail

    assert binomial_tail(3, 5, 0.5) == pytest.approx(16 / 32)
    assert binomial_tail(60, 60, 0.5) == pytest.approx(0.5**60, rel=1e-9)  # not 0 from 1 - 1
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0
    assert 0.3 < binomial_tail(10, 2000, 0.005) < 0.6  # 2000 trials: no float overflow
