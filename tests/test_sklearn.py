"""``zmdevice.ZeroMatchClassifier``: a scikit-learn estimator over ``zmdevice.train``, run
inside scikit-learn's cross-validation and cleanlab's ``CleanLearning`` on a tiny student
and a tiny text-embed teacher, offline."""

import gc
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import FILLER, TEXT_CLASSES, TEXT_WORDS
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import zmdevice
from zmdevice.pseudolabels import read_pseudolabels

OPTIONS = dict(
    threads=1,
    eval_every=0,
    kd_batch_size=8,
    labeled_batch_size=3,
    unlabeled_batch_size=8,
    eval_batch_size=32,
    bn_recalibration_batches=1,
)


def texts(count, seed=0):
    """``count`` short texts of the 3 classes in turn, and their labels."""
    rng = random.Random(seed)
    items, labels = [], []
    for i in range(count):
        name = TEXT_CLASSES[i % 3]
        words = [
            rng.choice(TEXT_WORDS[name]) if rng.random() < 0.6 else rng.choice(FILLER)
            for _ in range(5)
        ]
        items.append(" ".join(words))
        labels.append(name)
    return items, labels


def estimator(embed_dir, **changes):
    settings = dict(
        teacher=f"text-embed:{embed_dir}",
        student="tiny-distilbert",
        kd_steps=4,
        ssl_steps=4,
        train_options=OPTIONS,
    )
    return zmdevice.ZeroMatchClassifier(**{**settings, **changes})


@pytest.fixture(scope="module")
def fitted(embed_dir):
    """An estimator fitted on 18 labeled texts and a pool of 30 (labeled ones included)."""
    items, labels = texts(30)
    return estimator(embed_dir).fit(items[:18], labels[:18], X_unlabeled=items), items, labels


def test_parameters_are_stored_unchanged_and_clone_gives_an_unfitted_twin(fitted, embed_dir):
    clf = estimator(embed_dir, seed=3)
    params = clf.get_params()
    assert params["seed"] == 3 and params["train_options"] is OPTIONS
    assert params["teacher"] == f"text-embed:{embed_dir}"
    twin = clone(fitted[0])
    assert twin.get_params() == fitted[0].get_params()
    assert not hasattr(twin, "student_") and not hasattr(twin, "classes_")
    assert clf.set_params(kd_steps=2).kd_steps == 2
    with pytest.raises(NotFittedError, match="not fitted yet"):
        twin.predict(["a dog"])
    with pytest.raises(zmdevice.UserError):
        twin.predict_proba(["a dog"])


def test_fit_labels_the_pool_with_the_teacher_and_predicts_in_classes_order(fitted, embed_dir):
    clf, items, labels = fitted
    assert isinstance(clf.classes_, np.ndarray)
    assert clf.classes_.tolist() == sorted(TEXT_CLASSES)
    assert clf.student_.classes_.tolist() == clf.classes_.tolist()
    probs = clf.predict_proba(np.array(items[:7]))  # numpy strings are texts too
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert clf.predict(items[:7]).tolist() == clf.classes_[probs.argmax(axis=1)].tolist()
    # The run made its pseudo-labels with the teacher, over the whole pool, with the
    # labeled examples' help (the label source chosen by cross-validation on them).
    made = read_pseudolabels(clf.student_.out / "pseudo_labels.parquet")
    assert made.metadata["teacher"]["name"] == f"text-embed:{embed_dir}"
    assert made.metadata["teacher"]["label_source"]["scored"] == 18
    assert len(made.ids) == 30
    assert clf.summary_["labeled"] == 18 and clf.summary_["unlabeled"] == 30


def test_integer_labels_come_back_as_the_same_integers(embed_dir):
    items, labels = texts(12)
    y = np.array([TEXT_CLASSES.index(name) * 10 for name in labels])  # 0, 10, 20
    clf = estimator(embed_dir, kd_steps=2, ssl_steps=2).fit(items, y)
    assert clf.classes_.tolist() == [0, 10, 20] and clf.classes_.dtype == y.dtype
    # "10" sorts before "20" and after "0" as text too, but the columns follow classes_
    # whatever the student's own order.
    assert clf.student_.classes == ["0", "10", "20"]
    assert set(clf.predict(items).tolist()) <= {0, 10, 20}
    assert 0.0 <= clf.score(items, y) <= 1.0


def test_cross_val_score_fits_clones_on_each_fold(embed_dir):
    from sklearn.model_selection import cross_val_score

    items, labels = texts(24)
    scores = cross_val_score(estimator(embed_dir), items, labels, cv=2)
    assert scores.shape == (2,) and np.all((scores >= 0.0) & (scores <= 1.0))


def test_cleanlab_finds_label_issues_and_fits_without_them(embed_dir):
    from cleanlab.classification import CleanLearning

    items, labels = texts(24)
    y = np.array([TEXT_CLASSES.index(name) for name in labels])
    X = np.array(items, dtype=object)  # cleanlab splits X by index arrays
    learner = CleanLearning(estimator(embed_dir), cv_n_folds=2, seed=0)
    issues = learner.find_label_issues(X, y)
    assert len(issues) == 24
    assert issues["given_label"].tolist() == y.tolist()
    assert issues["label_quality"].between(0, 1).all()
    learner.fit(X, y, label_issues=issues)
    assert set(learner.predict(X[:6]).tolist()) <= {0, 1, 2}


def test_bad_input_is_a_user_error(embed_dir):
    clf = estimator(embed_dir)
    items, labels = texts(6)
    with pytest.raises(zmdevice.UserError, match="one label per item"):
        clf.fit(items, labels[:5])
    with pytest.raises(zmdevice.UserError, match="at least two classes"):
        clf.fit(items, ["animal"] * 6)
    with pytest.raises(zmdevice.UserError, match="single one"):
        clf.fit("a dog", ["animal"])
    with pytest.raises(zmdevice.UserError, match="comma"):
        clf.fit(items, ["a,b", "c"] * 3)
    with pytest.raises(zmdevice.UserError, match="set by the estimator's own parameters"):
        estimator(embed_dir, train_options={"kd_steps": 3}).fit(items, labels)
    with pytest.raises(zmdevice.UserError, match="unknown option"):
        estimator(embed_dir, train_options={"no_such_option": 3}).fit(items, labels)


def test_a_temporary_fit_folder_goes_with_the_estimator(embed_dir, tmp_path):
    items, labels = texts(9)
    clf = estimator(embed_dir, kd_steps=1, ssl_steps=1).fit(items, labels)
    first = clf.student_.out
    assert (first / "student.safetensors").is_file()
    clf.fit(items, labels)  # a refit replaces the folder
    second = clf.student_.out
    assert not first.exists() and (second / "student.safetensors").is_file()
    del clf
    gc.collect()
    assert not second.exists()
    # A folder given as ``out`` is the user's: kept, and refits replace its files.
    kept = estimator(embed_dir, kd_steps=1, ssl_steps=1, out=tmp_path / "mine")
    kept.fit(items, labels).fit(items, labels)
    del kept
    gc.collect()
    assert (tmp_path / "mine" / "student.safetensors").is_file()


def test_without_scikit_learn_the_estimator_names_its_extra():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import zmdevice\n"
        "try:\n"
        "    zmdevice.ZeroMatchClassifier\n"
        "except zmdevice.UserError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("pip install 'zmdevice[sklearn]'")
    assert len(result.stdout.strip().splitlines()) == 1
