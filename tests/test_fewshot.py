"""zmdevice.fewshot: the probe times the zero-shot prior, and `label --few-shot` end to end."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import TOPIC_NAMES, write_table

from zmdevice.classes import load_classes
from zmdevice.config import LabelConfig
from zmdevice.data import open_dataset
from zmdevice.errors import UserError
from zmdevice.fewshot import adapt_teacher, fit_adapter, teacher_outputs
from zmdevice.labeling.run import run_label
from zmdevice.pseudolabels import read_pseudolabels
from zmdevice.teachers import build_teacher

torch.set_num_threads(1)
WORDS = {
    "sports": ["game team ball", "the match"],
    "politics": ["vote law election", "a vote"],
    "science": ["atom cell experiment", "atom cell"],
}


def clusters(rng, per_class=4, dim=6, spread=0.05):
    """Three tight clusters around orthogonal directions: (features, labels)."""
    centres = np.eye(3, dim)
    labels = np.repeat(np.arange(3), per_class)
    return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_probe_alone_separates_clusters_the_prior_gets_wrong():
    rng = np.random.default_rng(0)
    features, labels = clusters(rng)
    adapter = fit_adapter(features, labels, 3, l2=0.001, zero_shot_weight=0.0)
    test_features, test_labels = clusters(rng, per_class=20)
    wrong_prior = np.full((len(test_labels), 3), 0.1)
    wrong_prior[np.arange(len(test_labels)), (test_labels + 1) % 3] = 0.8
    probs = adapter.probs(test_features, wrong_prior)
    assert (probs.argmax(1) == test_labels).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_zero_shot_weight_and_l2_trade_the_probe_against_the_prior():
    rng = np.random.default_rng(1)
    features, labels = clusters(rng)
    test_features, test_labels = clusters(rng, per_class=20)
    prior = np.full((len(test_labels), 3), 0.05)
    prior[np.arange(len(test_labels)), (test_labels + 1) % 3] = 0.9
    # A heavily penalised probe is nearly flat: the prior decides.
    flat = fit_adapter(features, labels, 3, l2=100.0, zero_shot_weight=1.0)
    assert (flat.probs(test_features, prior).argmax(1) == (test_labels + 1) % 3).all()
    # A confident probe outweighs the same prior.
    sharp = fit_adapter(features, labels, 3, l2=1e-4, zero_shot_weight=1.0)
    assert (sharp.probs(test_features, prior).argmax(1) == test_labels).all()


def test_fit_is_deterministic_and_needs_labels():
    rng = np.random.default_rng(2)
    features, labels = clusters(rng)
    first = fit_adapter(features, labels, 3)
    second = fit_adapter(features, labels, 3)
    np.testing.assert_array_equal(first.weight, second.weight)
    with pytest.raises(UserError, match="needs labeled examples"):
        fit_adapter(features[:0], labels[:0], 3)


def texts(count):
    names = list(WORDS)
    return [(f"t{i:03d}", WORDS[names[i % 3]][(i // 3) % 2], names[i % 3]) for i in range(count)]


def test_adapted_teacher_keeps_features_and_records_the_labeled_set(tmp_path, embed_dir):
    classes = load_classes(TOPIC_NAMES)
    teacher = build_teacher(f"text-embed:{embed_dir}", classes)
    labeled = open_dataset(write_table(tmp_path / "l.csv", texts(6)), require_labels=True)
    adapted = adapt_teacher(teacher, labeled, classes, l2=1e-3, zero_shot_weight=0.0)
    pool = open_dataset(write_table(tmp_path / "p.csv", texts(12)), require_labels=True)
    features, zero_shot = teacher_outputs(teacher, pool)
    adapted_features, probs = teacher_outputs(adapted, pool)
    np.testing.assert_allclose(adapted_features, features)
    truth = np.array([classes.index(label) for label in pool.labels])
    assert (probs.argmax(1) == truth).all()  # the tiny embedder's texts separate by word
    assert adapted.info["few_shot"]["examples"] == 6
    assert adapted.info["few_shot"]["fingerprint"] == labeled.fingerprint()
    assert teacher.info.get("few_shot") is None  # the original is left alone


def labeling_setup(tmp_path, embed_dir, count):
    """texts.csv (``count`` unlabeled texts) and l.csv (6 labeled) in ``tmp_path``, and the
    LabelConfig fields every labeling run of these tests shares."""
    write_table(tmp_path / "texts.csv", texts(count), labels=False)
    write_table(tmp_path / "l.csv", texts(6))
    return dict(
        data=tmp_path / "texts.csv",
        classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed_dir}",
        batch_size=4,
        device="cpu",
        workers=0,
    )


def test_label_few_shot_without_refining_writes_the_adapted_teachers_labels(tmp_path, embed_dir):
    base = labeling_setup(tmp_path, embed_dir, 12)
    run_label(LabelConfig(**base, out=tmp_path / "zs.parquet"))
    few_shot_only = dict(few_shot=tmp_path / "l.csv", refine=False)
    run_label(LabelConfig(**base, out=tmp_path / "fs.parquet", **few_shot_only))
    zero_shot, few_shot = (read_pseudolabels(tmp_path / n) for n in ("zs.parquet", "fs.parquet"))
    assert zero_shot.metadata["teacher"].get("few_shot") is None
    assert few_shot.metadata["teacher"]["few_shot"]["examples"] == 6
    assert not np.allclose(zero_shot.dense_probs(), few_shot.dense_probs())
    # The file holds what the library's adapted teacher predicts, and is not less accurate.
    classes = load_classes(TOPIC_NAMES)
    adapted = adapt_teacher(
        build_teacher(f"text-embed:{embed_dir}", classes),
        open_dataset(tmp_path / "l.csv", require_labels=True),
        classes,
    )
    _, expected = teacher_outputs(adapted, open_dataset(tmp_path / "texts.csv"))
    np.testing.assert_array_equal(few_shot.label, expected.argmax(1))
    truth = np.array([classes.index(row[2]) for row in texts(12)])
    assert (few_shot.label == truth).mean() >= (zero_shot.label == truth).mean()
    assert few_shot.metadata["teacher"]["label_source"]["how"] == "only candidate"


def test_label_with_labeled_examples_writes_the_source_cross_validation_chose(tmp_path, embed_dir):
    from zmdevice.label_source import CANDIDATES, DEFAULT_SOURCES, make_labels

    base = labeling_setup(tmp_path, embed_dir, 24)
    run_label(LabelConfig(**base, out=tmp_path / "zs.parquet"))
    summary = run_label(
        LabelConfig(**base, out=tmp_path / "auto.parquet", few_shot=tmp_path / "l.csv")
    )
    zero_shot, chosen = (read_pseudolabels(tmp_path / n) for n in ("zs.parquet", "auto.parquet"))
    decision = chosen.metadata["teacher"]["label_source"]
    assert decision["allowed"] == list(DEFAULT_SOURCES) and decision["how"] == "cross-validation"
    assert decision["scored"] == 6 and decision["folds"] == 2
    # Every source is scored; the choice is the best of the allowed ones.
    scores = {name: c["accuracy"] for name, c in decision["candidates"].items()}
    assert sorted(scores) == sorted(CANDIDATES)
    allowed = decision["allowed"]
    assert decision["chosen"] == max(allowed, key=lambda n: (scores[n], -allowed.index(n)))
    assert any(line.startswith("  labels: " + decision["chosen"]) for line in summary["lines"])
    # The file holds the chosen source's labels, remade here from the same FM outputs.
    classes = load_classes(TOPIC_NAMES)
    teacher = build_teacher(f"text-embed:{embed_dir}", classes)
    labeled = open_dataset(tmp_path / "l.csv", require_labels=True)
    data_features, _ = teacher_outputs(teacher, open_dataset(tmp_path / "texts.csv"))
    labeled_features, labeled_probs = teacher_outputs(teacher, labeled)
    from zmdevice.data import label_indices
    from zmdevice.label_source import Evidence

    evidence = Evidence(
        data_features.astype(np.float16).astype(np.float32),  # as the parts keep them
        zero_shot.dense_probs(),
        labeled_features,
        label_indices(labeled, classes),
        labeled_probs,
    )
    expected, _ = make_labels(decision["chosen"], evidence)
    np.testing.assert_array_equal(chosen.label, expected.argmax(1))
    assert not (tmp_path / ".auto.parquet.parts").exists()


def test_few_shot_with_an_unknown_class_or_a_teacher_without_features_fails(tmp_path, embed_dir):
    write_table(tmp_path / "texts.csv", texts(6), labels=False)
    write_table(tmp_path / "bad.csv", [("x", "game team ball", "cooking")])
    config = LabelConfig(
        data=tmp_path / "texts.csv",
        classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed_dir}",
        out=tmp_path / "o.parquet",
        device="cpu",
        workers=0,
    )
    with pytest.raises(UserError, match="cooking"):
        run_label(dataclasses.replace(config, few_shot=tmp_path / "bad.csv"))
    assert not (tmp_path / "o.parquet").exists()
    teacher = build_teacher(f"text-embed:{embed_dir}", load_classes(TOPIC_NAMES))
    teacher.features_and_probs = None
    labeled = open_dataset(write_table(tmp_path / "l.csv", texts(3)), require_labels=True)
    with pytest.raises(UserError, match="needs a teacher with a feature space"):
        adapt_teacher(teacher, labeled, load_classes(TOPIC_NAMES))


def test_label_refine_spreads_from_the_labeled_set_and_records_how(tmp_path, embed_dir):
    base = labeling_setup(tmp_path, embed_dir, 24)
    run_label(LabelConfig(**base, out=tmp_path / "zs.parquet"))
    summary = run_label(
        LabelConfig(**base, out=tmp_path / "rf.parquet", few_shot=tmp_path / "l.csv", refine=True)
    )
    zero_shot, refined = (read_pseudolabels(tmp_path / n) for n in ("zs.parquet", "rf.parquet"))
    info = refined.metadata["teacher"]["refine"]
    assert info["labeled"] == 6
    # --refine forces a refined source; cross-validation decides the prior.
    decision = refined.metadata["teacher"]["label_source"]
    assert decision["allowed"] == ["refined", "refined-no-prior"]
    assert info["prior_weight"] == float(decision["chosen"] == "refined")
    verdict = "kept" if info["prior_weight"] else "dropped"
    assert f"refined from 6 labeled examples; the FM's few-shot prior {verdict}" in "\n".join(
        summary["lines"]
    )
    few_shot = refined.metadata["teacher"].get("few_shot")
    assert (few_shot is not None) == bool(info["prior_weight"])  # the prior is the few-shot one
    assert list(refined.ids) == list(zero_shot.ids)
    assert not (tmp_path / ".rf.parquet.parts").exists()
    assert summary["out"] == str(tmp_path / "rf.parquet")
    truth = np.array([load_classes(TOPIC_NAMES).index(row[2]) for row in texts(24)])
    assert (refined.label == truth).mean() >= (zero_shot.label == truth).mean()
    # Without labeled examples only the teacher's own labels are spread.
    summary = run_label(LabelConfig(**base, out=tmp_path / "r0.parquet", refine=True))
    assert read_pseudolabels(tmp_path / "r0.parquet").metadata["teacher"]["refine"]["labeled"] == 0
    assert any("no labeled examples" in line for line in summary["lines"])


def test_refine_with_shards_or_ray_is_refused_up_front(tmp_path):
    from zmdevice.config import ConfigError

    base = dict(data=tmp_path / "t.csv", classes=TOPIC_NAMES, teacher="minilm", refine=True)
    for extra in ({"shard": "0/2"}, {"engine": "ray"}):
        with pytest.raises(ConfigError, match="--refine needs every sample"):
            LabelConfig(**base, **extra)


def test_label_refine_with_a_class_prior_rebalances_and_bad_priors_fail_first(tmp_path, embed_dir):
    base = labeling_setup(tmp_path, embed_dir, 24)
    shares = {"sports": 0.5, "politics": 0.25, "science": 0.25}
    spec = ",".join(f"{name}={share}" for name, share in shares.items())
    summary = run_label(
        LabelConfig(**base, out=tmp_path / "p.parquet", refine=True, class_prior=spec)
    )
    labels = read_pseudolabels(tmp_path / "p.parquet")
    prior = labels.metadata["teacher"]["refine"]["class_prior"]
    order = TOPIC_NAMES.split(",")
    assert prior["shares"] == pytest.approx([shares[name] for name in order])
    # The file holds the rebalanced labels (compressed: a few parts in a thousand).
    assert labels.dense_probs().mean(0) == pytest.approx(prior["shares"], abs=0.01)
    assert prior["label_shares_before"] != pytest.approx(prior["shares"], abs=0.05)
    assert any("rebalanced to the class prior" in line for line in summary["lines"])
    # A bad prior fails before the teacher runs and leaves nothing behind.
    for bad in ("sports=1,politics=1", "sports=1,politics=1,science=1,art=1"):
        with pytest.raises(UserError, match="--class-prior"):
            run_label(LabelConfig(**base, out=tmp_path / "b.parquet", refine=True, class_prior=bad))
    assert not list(tmp_path.glob("*b.parquet*"))


def test_class_prior_without_refine_is_refused_and_the_cli_exits_2(tmp_path, embed_dir):
    from typer.testing import CliRunner

    from zmdevice.cli import app
    from zmdevice.config import ConfigError

    base = labeling_setup(tmp_path, embed_dir, 6)
    with pytest.raises(ConfigError, match="--class-prior rebalances the refined labels.*--refine"):
        LabelConfig(**base, class_prior="balanced")
    args = ["label", str(tmp_path / "texts.csv"), "--classes", TOPIC_NAMES, "--teacher"]
    args += [f"text-embed:{embed_dir}", "--out", str(tmp_path / "c.parquet"), "--refine"]
    result = CliRunner().invoke(app, [*args, "--class-prior", "sports=2,politics=1"])
    assert result.exit_code == 2, result.output
    assert "no share for class(es) 'science'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "c.parquet").exists()


def test_unequal_class_counts_count_each_class_equally(monkeypatch):
    from zmdevice import fewshot

    assert fewshot.class_balance(np.array([0, 0, 1, 1]), 3) is None  # equal: nothing to do
    weights = fewshot.class_balance(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [2 / 3, 2.0, 0.0])  # each labeled class weighs 2
    # 12 examples of class 0 beside 2 of class 1, the same spread: a point halfway between
    # is an even call for the balanced probe, while the raw counts push it into class 0.
    rng = np.random.default_rng(3)
    centres = np.eye(2, 6)
    labels = np.repeat([0, 1], [12, 2])
    features = centres[labels] + 0.3 * rng.standard_normal((14, 6))
    halfway = (centres[0] + centres[1])[None] / np.sqrt(2)
    flat = np.full((1, 2), 0.5)
    balanced = fit_adapter(features, labels, 2, zero_shot_weight=0.0).probs(halfway, flat)
    monkeypatch.setattr(fewshot, "class_balance", lambda *args: None)
    unbalanced = fit_adapter(features, labels, 2, zero_shot_weight=0.0).probs(halfway, flat)
    assert unbalanced[0, 0] > 0.6 and 0.3 < balanced[0, 1] < 0.7


def test_a_class_without_examples_keeps_the_fms_probability():
    rng = np.random.default_rng(4)
    features, labels = clusters(rng)  # three classes
    seen = labels < 2  # class 2 has no labeled example
    adapter = fit_adapter(features[seen], labels[seen], 3)
    test_features, test_labels = clusters(rng, per_class=10)
    prior = rng.dirichlet(np.ones(3), size=len(test_labels))
    probs = adapter.probs(test_features, prior)
    np.testing.assert_allclose(probs[:, 2], prior[:, 2], rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # Among the classes it has seen, the probe still decides.
    known = test_labels < 2
    assert (probs[known, :2].argmax(1) == test_labels[known]).all()
    # With every class seen, nothing is held back for the FM.
    assert fit_adapter(features, labels, 3).unseen is None
