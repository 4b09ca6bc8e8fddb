"""Does a precision cost accuracy? The same training runs at fp32 and at another precision.

For each seed, ``run_train`` trains the student twice with every other setting equal, once
per precision, and the accuracy on a DEV split (never the test split) is compared: mean and
per-seed values, and the mean difference (target: within 0.5 points).

The dev split is ``--dev`` when given (a labeled table or class folders). Without it, it is
carved from ``--pool-gold`` (the unlabeled pool with its true labels, e.g.
``data/text/unlabeled_gold.csv`` of ``examples/build_datasets.py``): ``--dev-size`` rows
drawn with a fixed seed, none of them a labeled example. Those rows stay in the unlabeled
pool, whose labels training never sees (the FM's pseudo-labels aside).

Usage::

    python examples/build_datasets.py --out data --only text
    zmdevice label data/text/unlabeled.csv --classes data/text/classes.toml --teacher minilm
    python benchmarks/precision_quality.py --data data/text \\
        --pseudo-labels labels/unlabeled.parquet --student distilbert --precision bf16 \\
        --seeds 0 1 2 --json quality.json
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import tempfile
from pathlib import Path

TARGET_POINTS = 0.5


def carve_dev(pool_gold: Path, labeled: Path, size: int, out: Path) -> Path:
    """``size`` rows of ``pool_gold`` that are not labeled examples, as a labeled CSV."""
    with open(labeled, newline="") as handle:
        taken = {row["id"] for row in csv.DictReader(handle)}
    with open(pool_gold, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["id"] not in taken]
    random.Random("zmdevice-precision-dev").shuffle(rows)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows({k: row[k] for k in ("id", "text", "label")} for row in rows[:size])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of build_datasets.py")
    parser.add_argument("--pseudo-labels", type=Path, required=True)
    parser.add_argument("--student", default="distilbert")
    parser.add_argument("--precision", default="bf16", help="compared with fp32")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dev", type=Path, help="labeled dev data (default: carved)")
    parser.add_argument("--dev-size", type=int, default=500)
    parser.add_argument("--kd-steps", type=int)
    parser.add_argument("--ssl-steps", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from zmdevice.config import TrainConfig
    from zmdevice.evaluate import run_evaluate_student
    from zmdevice.training.run import run_train

    work = Path(tempfile.mkdtemp(prefix="precision-quality-"))
    labeled = args.data / "labeled.csv"
    dev = args.dev or carve_dev(
        args.data / "unlabeled_gold.csv", labeled, args.dev_size, work / "dev.csv"
    )
    accuracy: dict[str, list[float]] = {"fp32": [], args.precision: []}
    for seed in args.seeds:
        for precision in accuracy:
            out = work / f"{precision}-s{seed}"
            config = TrainConfig(
                labeled=labeled,
                unlabeled=args.data / "unlabeled.csv",
                pseudo_labels=args.pseudo_labels,
                student=args.student,
                out=out,
                seed=seed,
                kd_steps=args.kd_steps,
                ssl_steps=args.ssl_steps,
                precision=precision,
            )
            run_train(config)
            score = run_evaluate_student(out, dev, device=config.device)["accuracy"]
            accuracy[precision].append(100 * score)
            print(f"seed {seed} {precision}: dev accuracy {100 * score:.2f}%", flush=True)
    means = {p: statistics.fmean(values) for p, values in accuracy.items()}
    difference = means[args.precision] - means["fp32"]
    print(
        f"{args.student}: fp32 {means['fp32']:.2f}, {args.precision} {means[args.precision]:.2f} "
        f"(dev, {len(args.seeds)} seeds): {difference:+.2f} points "
        f"({'within' if abs(difference) <= TARGET_POINTS else 'beyond'} {TARGET_POINTS})"
    )
    if args.json:
        result = {
            "student": args.student,
            "dev": str(dev),
            "seeds": args.seeds,
            "accuracy": accuracy,
            "means": means,
            "difference_points": difference,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
