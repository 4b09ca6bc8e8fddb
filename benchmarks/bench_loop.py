"""Time `suggest` and `check` on synthetic data given the FM's features (no teacher runs).

10,000 texts of 20 classes with 384-d features (one Gaussian cluster per class, ``--noise``
per dimension), a 70%-right fake FM's pseudo-label file, and the features as a .npy file
(what the feature cache holds). Prints wall-clock and CPU seconds (one thread) of:

- suggest, cold start (no labels), n=50;
- suggest, a later round: 200 labels (committee of the FM and the few-shot adapter), n=50;
- check on 10,000 labeled examples, 1 in 10 labels moved to a random other class (5-fold
  probe, 128 principal directions, FM prior), with how many flips rank in the top 2,000;
  then our ranking and cleanlab's on the same probe probabilities (without the FM prior).

Usage: ``taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/bench_loop.py [--noise 10]``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(root: Path, rows: int, classes: int, dim: int, noise: float, seed: int = 0):
    """Write data.csv, labels.parquet, features.npy; return (names, gold, features, fm)."""
    from zmdevice.data import open_dataset
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    rng = np.random.default_rng(seed)
    names = [f"class{c:02d}" for c in range(classes)]
    gold = rng.integers(0, classes, rows)
    centres = rng.standard_normal((classes, dim))
    features = centres[gold] + noise * rng.standard_normal((rows, dim))
    np.save(root / "features.npy", features.astype(np.float16), allow_pickle=False)
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([f"s{i:05d}", f"text {i}"] for i in range(rows))
    dataset = open_dataset(root / "data.csv")
    guess = np.where(rng.random(rows) < 0.7, gold, rng.integers(0, classes, rows))
    logits = rng.standard_normal((rows, classes))
    logits[np.arange(rows), guess] += 3.0
    fm = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metadata = build_metadata(
        classes=names,
        teacher={"spec": "synthetic"},
        data={"fingerprint": dataset.fingerprint()},
        top_k=classes,
    )
    with PseudoLabelWriter(root / "labels.parquet", metadata) as writer:
        writer.write_probs(dataset.ids, fm.astype(np.float32))
    return names, gold, features, fm


def write_labeled(path: Path, names, gold, rows, flip_every: int, rng) -> set[int]:
    """A labeled table of ``rows`` with every ``flip_every``-th label moved to a random
    other class; returns the flipped rows."""
    labels = gold[rows].copy()
    flips = rows[::flip_every]
    shift = rng.integers(1, len(names), len(flips))
    labels[::flip_every] = (labels[::flip_every] + shift) % len(names)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for row, label in zip(rows, labels, strict=True):
            writer.writerow([f"s{row:05d}", f"text {row}", names[label]])
    return set(int(f) for f in flips)


def timed(label: str, function):
    """Run ``function``; print its wall-clock and CPU seconds (they differ on a busy core)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--noise", type=float, default=2.5, help="feature noise per dimension")
    args = parser.parse_args()

    def imports():
        import cleanlab.filter  # noqa: F401
        import torch

        torch.set_num_threads(1)
        torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo

    # Imported once before timing: torch, its optimizers' first use (torch._dynamo) and
    # cleanlab cost seconds of imports that a command pays once, not per step.
    timed("imports (torch, torch.optim, cleanlab)", imports)
    from zmdevice.curation.check import CheckConfig, cleanlab_ranking, confident_issues, run_check
    from zmdevice.curation.suggest import SuggestConfig, run_suggest

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        names, gold, _, _ = make_data(root, args.rows, args.classes, args.dim, args.noise)
        print(f"{args.rows} rows, {args.classes} classes, {args.dim}-d features")
        common = dict(
            data=root / "data.csv", pseudo_labels=root / "labels.parquet",
            features=root / "features.npy",
        )  # fmt: skip
        timed(
            "suggest cold start (n=50)",
            lambda: run_suggest(SuggestConfig(out=root / "cold.csv", n=50, **common)),
        )
        few = rng.choice(args.rows, 200, replace=False)
        write_labeled(root / "few.csv", names, gold, few, 10**9, rng)
        summary, _ = timed(
            "suggest later round (200 labels, n=50)",
            lambda: run_suggest(
                SuggestConfig(out=root / "next.csv", n=50, labeled=root / "few.csv", **common)
            ),
        )
        assert summary["mode"] == "uncertainty"
        everything = np.arange(args.rows)
        flips = write_labeled(root / "all.csv", names, gold, everything, 10, rng)
        summary, _ = timed(
            f"check {args.rows} labeled (ours)",
            lambda: run_check(CheckConfig(labeled=root / "all.csv", out=root / "c.csv", **common)),
        )
        top = {int(r["id"][1:]) for r in summary["rows"][: 2 * len(flips)]}
        print(f"  flips found in the top 2x-flips rows: {len(top & flips)}/{len(flips)}")
        from zmdevice.curation.check import cross_val_probs
        from zmdevice.curation.fm_space import unit_rows

        features = np.load(root / "features.npy").astype(np.float32)
        labels = np.array(
            [names.index(r["label"]) for r in sorted(summary["rows"], key=lambda r: r["id"])]
        )
        probs, _ = timed(
            "  the cross-validated probe alone (no FM prior)",
            lambda: cross_val_probs(unit_rows(features, None), labels, args.classes)[0],
        )
        for name, rank in (
            ("ours", lambda: confident_issues(probs, labels).order),
            ("cleanlab", lambda: cleanlab_ranking(probs, labels)[0]),
        ):
            order, _ = timed(f"  {name} ranking of these probabilities", rank)
            top = set(order[: 2 * len(flips)].tolist())
            print(f"    flips in the top 2x-flips rows: {len(top & flips)}/{len(flips)}")


if __name__ == "__main__":
    main()
