"""Labeling throughput of `zmdevice label --engine ray` against the number of Ray workers.

In one process: the local engine labels the texts once, then a local Ray cluster (every CPU
of this machine) labels them again with each ``--workers`` count. Each row is a whole
``run_label`` (the driver's teacher load, the actors' start and teacher loads, the labeling
and the final file), so it is what a user waits for; "ratio" is that row's throughput over
the local engine's in the same run. Every Ray file is checked to equal the local one.

    python benchmarks/bench_label_ray.py                      # minilm, 2,000 texts, 1 and 2
    python benchmarks/bench_label_ray.py --workers 1 2 4 --count 2000

On a small machine the Ray rows measure the engine's fixed cost (cluster services, actor
start-up, one teacher per actor, the driver's copy) more than its scaling: the pool earns its
keep when each worker gets its own GPU or node.

Writes benchmarks/work/bench_label_ray.json (or ``--json PATH``) next to the printed table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "examples" / "default" / "text"


def texts_file(folder: Path, count: int) -> Path:
    """The first ``count`` texts of the default unlabeled pool, repeated if it holds fewer."""
    with open(TEXT / "unlabeled.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    path = folder / "texts.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for i in range(count):
            writer.writerow([f"{rows[i % len(rows)]['id']}-{i}", rows[i % len(rows)]["text"]])
    return path


def timed_label(data: Path, out: Path, args, engine: str, workers: int = 1) -> dict:
    from zmdevice.config import LabelConfig
    from zmdevice.labeling.run import run_label

    started = time.perf_counter()
    summary = run_label(
        LabelConfig(
            data=data, classes=str(TEXT / "classes.toml"), teacher=args.teacher, out=out,
            batch_size=args.batch_size, device="cpu" if engine == "local" else "auto",
            engine=engine, ray_workers=workers,
        )
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "engine": engine,
        "workers": workers if engine == "ray" else None,
        "seconds": seconds,
        "samples_per_s": summary["count"] / seconds,
        "labeling_samples_per_s": summary["samples_per_s"],
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine skew the rows
    }


def same_rows(a: Path, b: Path) -> bool:
    import numpy as np

    from zmdevice.pseudolabels import read_pseudolabels

    x, y = read_pseudolabels(a), read_pseudolabels(b)
    return (
        x.ids == y.ids
        and np.array_equal(x.label, y.label)
        and np.array_equal(x.topk_prob, y.topk_prob)
        and np.array_equal(x.topk_idx, y.topk_idx)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="minilm")
    parser.add_argument("--count", type=int, default=2000, help="texts to label")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/work/bench_label_ray.json")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="zmray") as tmp:
        folder = Path(tmp)
        data = texts_file(folder, args.count)
        rows = [timed_label(data, folder / "local.parquet", args, "local")]
        ray.init(
            num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
            _temp_dir=str(folder / "ray"),
        )  # fmt: skip
        try:
            for workers in args.workers:
                out = folder / f"ray-{workers}.parquet"
                row = timed_label(data, out, args, "ray", workers)
                row["same_file_as_local"] = same_rows(folder / "local.parquet", out)
                rows.append(row)
        finally:
            ray.shutdown()
    local = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio_to_local"] = row["samples_per_s"] / local
    print(f"{args.teacher}, {args.count} texts, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print("| engine | workers | seconds | samples/s | ratio to local | same file | load avg |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['engine']} | {row['workers'] or '-'} | {row['seconds']:.1f} | "
            f"{row['samples_per_s']:.1f} | {row['ratio_to_local']:.2f} | "
            f"{row.get('same_file_as_local', '-')} | {row['load_average_1min']:.1f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    setup = {"teacher": args.teacher, "count": args.count, "batch_size": args.batch_size}
    args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
