"""Plain helpers several test files share: data writers, fake pseudo-labels, the fast
training settings, folder snapshots. Fixtures built from them live in ``conftest.py``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from zmdevice.config import TrainConfig

# ------------------------------------------------------------------ labeling (tiny teachers)

TOPIC_NAMES = "sports,politics,science"
"""The classes of the labeling tests (the tiny teachers' vocabulary has these words)."""
TOPIC_WORDS = ["game team ball", "vote law election", "atom cell experiment", "the match", "a vote"]


def write_texts(path: Path, count: int, labels: bool = False) -> Path:
    """A text table of ``count`` short topic texts (ids t0000...), labeled if asked."""
    names = TOPIC_NAMES.split(",")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"] if labels else ["id", "text"])
        for i in range(count):
            row = [f"t{i:04d}", f"{TOPIC_WORDS[i % 5]} {TOPIC_WORDS[(i * 7) % 5]}"]
            writer.writerow(row + [names[i % 3]] if labels else row)
    return path


def write_table(path: Path, rows, labels: bool = True) -> Path:
    """A text table from (id, text, label) rows; ``labels=False`` drops the label column."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "text", "label"] if labels else ["id", "text"])
        for row in rows:
            writer.writerow(row if labels else row[:2])
    return path


# ------------------------------------------------------------------------- pseudo-labels


def noisy_teacher_probs(gold, num_classes: int, seed: int = 0, accuracy: float = 0.7):
    """float32 [N, C] probabilities of a fake FM that is right with probability
    ``accuracy`` (else a random class), 0.8 on its guess before normalising."""
    rng = np.random.default_rng(seed)
    probs = np.full((len(gold), num_classes), 0.1, dtype=np.float32)
    for row, label in enumerate(gold):
        guess = label if rng.random() < accuracy else int(rng.integers(num_classes))
        probs[row, guess] = 0.8
    return probs / probs.sum(axis=1, keepdims=True)


def write_pseudolabels(
    path: Path, ids, classes, fingerprint: str, probs=None, teacher: dict | None = None
) -> Path:
    """A pseudo-label file for ``ids`` made by the real writer; ``probs`` default: random
    (Dirichlet, seed 0); ``teacher`` its metadata record (default a fake spec)."""
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    if probs is None:
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.ones(len(classes)), size=len(ids)).astype(np.float32)
    metadata = build_metadata(
        classes=classes,
        teacher=teacher or {"spec": "fake"},
        data={"fingerprint": fingerprint},
        top_k=3,
    )
    with PseudoLabelWriter(path, metadata) as writer:
        writer.write_probs(list(ids), probs)
    return path


# ------------------------------------------------------------------ training (tiny students)

TEXT_CLASSES = ["animal", "plant", "food"]
TEXT_WORDS = {
    "animal": ["dog", "cat", "bird"],
    "plant": ["tree", "flower"],
    "food": ["bread", "fruit"],
}
FILLER = ["the", "a", "of", "and", "is", "with"]
IMAGE_CLASSES = ["red", "green", "blue"]
FAST = dict(
    threads=1,
    eval_every=5,
    kd_batch_size=8,
    labeled_batch_size=3,
    unlabeled_batch_size=8,
    eval_batch_size=32,
    bn_recalibration_batches=2,
)
"""Training settings small enough for a test (batches, evaluation, BN recalibration)."""


def image_config(root: Path, out: Path, **changes) -> TrainConfig:
    """A tiny-cnn run on the ``image_data`` fixture's folders."""
    return _tiny_run(root, out, "tiny-cnn", ("labeled", "unlabeled", "test"), changes)


def text_config(root: Path, out: Path, **changes) -> TrainConfig:
    """A tiny-distilbert run on the ``text_data`` fixture's tables."""
    names = ("labeled.csv", "unlabeled.csv", "test.csv")
    return _tiny_run(root, out, "tiny-distilbert", names, changes)


def _tiny_run(root: Path, out: Path, student: str, names: tuple, changes: dict) -> TrainConfig:
    labeled, unlabeled, test = (root / name for name in names)
    values = dict(
        **FAST,
        labeled=labeled,
        unlabeled=unlabeled,
        pseudo_labels=root / "labels.parquet",
        student=student,
        out=out,
        device="cpu",
        kd_steps=10,
        ssl_steps=10,
        test=test,
    )
    values.update(changes)
    return TrainConfig(**values)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(out) -> dict:
    """The saved student's tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "student.safetensors"))


# ----------------------------------------------------------------------------- folders


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of everything under ``folder`` (hidden files and
    folders too): equal snapshots mean nothing was written, removed or changed."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        state[key] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def clusters(rng, per_class=40, classes=3, dim=8, noise=0.15):
    """FM-like features in separated clusters around orthogonal directions: (features
    [per_class * classes, dim], class ids)."""
    import numpy as np

    labels = np.repeat(np.arange(classes), per_class)
    return np.eye(classes, dim)[labels] + noise * rng.standard_normal((len(labels), dim)), labels


def noisy_prior(rng, labels, classes=3, correct=0.6, top=0.8):
    """Teacher probabilities [N, C] right on about ``correct`` of the samples, else a random
    class; the guessed class gets ``top``, the others share the rest."""
    import numpy as np

    guess = np.where(
        rng.random(len(labels)) < correct, labels, rng.integers(0, classes, len(labels))
    )
    probs = np.full((len(labels), classes), (1 - top) / (classes - 1), dtype=np.float32)
    probs[np.arange(len(labels)), guess] = top
    return probs
