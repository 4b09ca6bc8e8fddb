"""zmdevice.refine: label spreading over the k-NN graph, its prior kept or dropped as the
labeled examples say (``zmdevice.label_source``), and the refined labels rebalanced to a class
prior the user gives (``zmdevice.classes.load_class_prior``)."""

import numpy as np
import pytest
import torch
from helpers import clusters, noisy_prior

from zmdevice.classes import load_class_prior, load_classes
from zmdevice.errors import UserError
from zmdevice.refine import (
    REBALANCE_ITERATIONS,
    REBALANCE_TOLERANCE,
    knn_graph,
    rebalance,
    refine_labels,
    refine_line,
    spread,
)

torch.set_num_threads(1)


def test_graph_is_symmetric_normalised_and_spreading_keeps_distributions():
    rng = np.random.default_rng(0)
    features, labels = clusters(rng)
    graph = knn_graph(features).to_dense().numpy()
    np.testing.assert_allclose(graph, graph.T, atol=1e-6)
    assert (np.diag(graph) == 0).all()
    assert np.abs(np.linalg.eigvalsh(graph)).max() <= 1 + 1e-4  # D^-1/2 W D^-1/2
    # Almost every edge stays inside a cluster.
    rows, cols = np.nonzero(graph)
    assert (labels[rows] == labels[cols]).mean() > 0.95
    probs = spread(knn_graph(features), noisy_prior(rng, labels))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_spreading_the_prior_alone_corrects_a_noisy_teacher():
    rng = np.random.default_rng(1)
    features, labels = clusters(rng)
    prior = noisy_prior(rng, labels)
    refined, info = refine_labels(features, prior)
    assert info == {"prior_weight": 1.0, "labeled": 0}
    before, after = (prior.argmax(1) == labels).mean(), (refined.argmax(1) == labels).mean()
    assert before < 0.8 and after > 0.95


def test_a_wrong_zero_shot_prior_is_outvoted_by_the_labeled_examples():
    """The FM is one class off everywhere; the few-shot prior learns the clusters from 4
    examples per class, and cross-validation on them says so."""
    rng = np.random.default_rng(2)
    features, labels = clusters(rng)
    labeled_features, labeled = clusters(rng, per_class=4)
    wrong = noisy_prior(rng, (labels + 1) % 3, correct=1.0)  # every sample one class off
    wrong_on_labeled = noisy_prior(rng, (labeled + 1) % 3, correct=1.0)
    refined, info = refine_labels(features, wrong, labeled_features, labeled, wrong_on_labeled)
    decision = info["decision"]
    assert decision["how"] == "cross-validation" and decision["scored"] == 12
    assert decision["zero_shot_accuracy_on_labeled"] == 0.0
    assert decision["candidates"]["refined"]["accuracy"] == 1.0
    assert info["labeled"] == 12 and info["prior_weight"] == 1.0
    assert (refined.argmax(1) == labels).mean() > 0.95
    assert (wrong.argmax(1) == labels).mean() == 0.0


def test_with_one_example_per_class_the_prior_follows_the_fms_accuracy_on_them():
    rng = np.random.default_rng(4)
    # Each class has two separate clusters; the labeled examples lie in the first of each.
    clusters_, ids = clusters(rng, classes=6)
    labels = ids % 3
    examples, example_ids = clusters(rng, per_class=1, classes=3)  # clusters 0, 1, 2
    examples = np.pad(examples[:, :3], ((0, 0), (0, clusters_.shape[1] - 3)))
    good = noisy_prior(rng, labels, correct=0.9)
    right = np.eye(3, dtype=np.float32)[example_ids]
    kept, info = refine_labels(clusters_, good, examples, example_ids, right)
    assert info["prior_weight"] == 1.0 and info["decision"]["how"] == "binomial test"
    assert info["decision"]["zero_shot_accuracy_on_labeled"] == 1.0
    wrong = np.eye(3, dtype=np.float32)[(example_ids + 1) % 3]
    dropped, info = refine_labels(clusters_, good, examples, example_ids, wrong)
    assert info["prior_weight"] == 0.0
    # Only the prior speaks for the clusters without examples (3, 4, 5).
    unreached = ids >= 3
    assert (kept.argmax(1)[unreached] == labels[unreached]).mean() > 0.75
    assert (dropped.argmax(1)[unreached] == labels[unreached]).mean() < 0.5
    reached = ~unreached
    assert (dropped.argmax(1)[reached] == labels[reached]).mean() > 0.95


def test_refinement_is_deterministic():
    rng = np.random.default_rng(3)
    features, labels = clusters(rng)
    labeled_features, labeled = clusters(rng, per_class=1)
    prior = noisy_prior(rng, labels)
    first, _ = refine_labels(features, prior, labeled_features, labeled, prior[:3])
    second, _ = refine_labels(features, prior, labeled_features, labeled, prior[:3])
    np.testing.assert_array_equal(first, second)


def test_too_many_samples_is_refused_before_any_work(monkeypatch):
    import zmdevice.refine as refine

    monkeypatch.setattr(refine, "MAX_SAMPLES", 10)
    with pytest.raises(UserError, match="--refine .* without --refine"):
        refine_labels(np.zeros((20, 4)), np.full((20, 2), 0.5))


# --------------------------------------------------------------------------- class prior


def test_rebalancing_meets_the_shares_with_one_weight_per_class():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(4, 0.5), size=300) + 0.01  # far above the 1e-12 floor
    probs[:, 0] += 1.0  # a teacher that favours class 0
    probs /= probs.sum(1, keepdims=True)
    shares = np.array([0.1, 0.2, 0.3, 0.4])
    rebalanced, rounds = rebalance(probs, shares)
    assert 1 < rounds <= REBALANCE_ITERATIONS
    np.testing.assert_allclose(rebalanced.sum(1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(rebalanced.mean(0), shares, rtol=REBALANCE_TOLERANCE)
    # Every row is its old row times the same per-class weights: a change of class prior,
    # so log(new / old) differs from row to row only by a constant.
    ratio = np.log(rebalanced) - np.log(probs)
    ratio -= ratio[:, :1]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), atol=1e-6)


def test_a_balanced_prior_corrects_a_teacher_biased_toward_one_class():
    rng = np.random.default_rng(6)
    features, labels = clusters(rng, per_class=60, noise=0.6)
    probs = noisy_prior(rng, labels, correct=1.0)
    probs[:, 0] *= 6  # most samples of classes 1 and 2 lean to class 0
    probs /= probs.sum(1, keepdims=True)
    plain, info = refine_labels(features, probs)
    balanced, info = refine_labels(features, probs, class_prior=[1 / 3] * 3)
    prior = info["class_prior"]
    assert prior["shares"] == pytest.approx([1 / 3] * 3)
    assert prior["label_shares_before"] == pytest.approx(plain.mean(0), abs=1e-5)
    assert max(prior["label_shares_before"]) > 0.45
    assert prior["label_shares_after"] == pytest.approx([1 / 3] * 3, abs=1e-3)
    assert (balanced.argmax(1) == labels).mean() > (plain.argmax(1) == labels).mean() + 0.1
    assert balanced.dtype == np.float32
    assert "rebalanced to the class prior (class shares" in refine_line(info)
    assert "rebalanced" not in refine_line(refine_labels(features, probs)[1])


def test_class_prior_specs_and_their_errors(tmp_path):
    classes = load_classes("cat,dog,bird")
    assert load_class_prior("balanced", classes) == pytest.approx([1 / 3] * 3)
    assert load_class_prior(" dog=1, cat=2 ,bird=1", classes) == pytest.approx([0.5, 0.25, 0.25])
    (tmp_path / "p.json").write_text('{"bird": 3, "dog": 1, "cat": 4}')
    assert load_class_prior(str(tmp_path / "p.json"), classes) == pytest.approx([0.5, 1 / 8, 3 / 8])
    (tmp_path / "p.toml").write_text("cat = 1\ndog = 1.5\nbird = 2.5\n")
    assert load_class_prior(str(tmp_path / "p.toml"), classes) == pytest.approx([0.2, 0.3, 0.5])
    (tmp_path / "list.json").write_text('["cat", "dog", "bird"]')
    (tmp_path / "broken.json").write_text('{"cat": 1,')
    for spec, message in [
        ("cat=2,dog=1", "no share for class.*'bird'"),
        ("cat=1,dog=1,bird=1,fish=1", "unknown class.*'fish'.*names of --classes"),
        ("cat=1,dog=0,bird=1", "share of class 'dog' is '0'; give a positive number"),
        ("cat=1,dog=x,bird=1", "share of class 'dog' is 'x'"),
        ("cat=1,dog=nan,bird=1", "share of class 'dog' is 'nan'"),
        ("cat=1,cat=2,dog=1,bird=1", "class 'cat' twice"),
        ("cats", "item 'cats' is not NAME=SHARE"),
        (str(tmp_path / "missing.json"), "class prior file not found"),
        (str(tmp_path / "broken.json"), "broken.json is not valid JSON"),
        (str(tmp_path / "list.json"), "must map each class name to its share"),
    ]:
        with pytest.raises(UserError, match=message):
            load_class_prior(spec, classes)
