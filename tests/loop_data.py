"""Small data for the suggest / check / Label Studio tests: a text table whose FM features
lie in one cluster per class, a pseudo-label file for it, the features as a .npy file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import clusters, noisy_prior, write_pseudolabels, write_table

CLASSES = ["sports", "politics", "science"]


def loop_data(root: Path, per_class: int = 20, correct: float = 0.8, seed: int = 0) -> dict:
    """data.csv (ids s000..), labels.parquet (an FM right on ~``correct``), features.npy.

    Returns:
        {"root", "data", "labels", "features", "gold" (int [N]), "x" (float [N, D]),
        "fm" (float [N, C]), "ids"}.
    """
    from zmdevice.data import open_dataset

    rng = np.random.default_rng(seed)
    x, gold = clusters(rng, per_class=per_class, classes=len(CLASSES), dim=8, noise=0.15)
    order = rng.permutation(len(gold))  # classes interleaved, not in blocks
    x, gold = x[order], gold[order]
    ids = [f"s{i:03d}" for i in range(len(gold))]
    rows = [(ids[i], f"text {i} about {CLASSES[g]}", CLASSES[g]) for i, g in enumerate(gold)]
    data = write_table(root / "data.csv", rows, labels=False)
    fm = noisy_prior(rng, gold, classes=len(CLASSES), correct=correct)
    fingerprint = open_dataset(data).fingerprint()
    labels = write_pseudolabels(root / "labels.parquet", ids, CLASSES, fingerprint, fm)
    features = root / "features.npy"
    np.save(features, x.astype(np.float32), allow_pickle=False)
    return {
        "root": root,
        "data": data,
        "labels": labels,
        "features": features,
        "gold": gold,
        "x": x,
        "fm": fm,
        "ids": ids,
        "rows": rows,
    }


def write_labeled(path: Path, rows, labels=None) -> Path:
    """A labeled table of (id, text, label) ``rows``; ``labels`` replaces their labels."""
    if labels is not None:
        rows = [(r[0], r[1], label) for r, label in zip(rows, labels, strict=True)]
    return write_table(path, rows)
