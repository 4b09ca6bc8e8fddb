"""The cost targets of `zmdevice train` (benchmarks/PERFORMANCE.md), one run per student.

For each student, a child process (so that peak RSS belongs to that student alone):

1. writes synthetic data of a realistic size (images: 28 px PNGs like Fashion-MNIST;
   text: short glosses) and a fake pseudo-label file;
2. runs ``run_train`` with the DEFAULT batch sizes and precision (``--precision auto``) on
   the CPU (zeromatch, a few stage-1 steps, then stage 2) and times every stage-2 step
   through the ``on_step`` callback:
   data pipeline + augmentation + forward + losses + backward + optimizer step;
3. right after each stage-2 step, times a bare forward+backward of the same student
   preset on a ready-made batch of the same composition (labeled weak + unlabeled weak +
   unlabeled strong), at the precision the run resolved, so both see the same machine
   conditions and do the same arithmetic;
4. reports mean step / mean bare (targets <= 1.10 images, <= 1.05 text; means, as one step
   in 4 builds the image views of the next 4) and the process's peak RSS
   (targets: <= 2 GB mobilenet_v3_small, <= 3 GB the MiniLM-initialised distilbert);
5. records the sizes of what the run leaves on disk: ``student.safetensors`` and the resume
   checkpoint ``checkpoints/last.pt``, saved once more at the last stage-2 step (outside
   the timed region) so that it holds the optimizer state as a mid-run checkpoint does.

Usage::

    python benchmarks/bench_train.py                 # both students
    python benchmarks/bench_train.py --student mobilenet_v3_small --steps 40
    python benchmarks/bench_train.py --json out.json  # + the results as one JSON list
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"mobilenet_v3_small": (1.10, 2.0), "distilbert": (1.05, 3.0)}
"""Per student: (step / bare ratio, at most; peak RSS in GB, at most)."""


def make_image_data(root: Path, n: int, classes: list[str]):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % len(classes)
        folder = root / "unlabeled"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
        if i < 4 * len(classes):
            labeled = root / "labeled" / classes[label]
            labeled.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(labeled / f"{i:05d}.png")
    return root / "labeled", root / "unlabeled"


def make_text_data(root: Path, n: int, classes: list[str]):
    import random

    words = [
        "animal",
        "plant",
        "food",
        "person",
        "place",
        "tool",
        "body",
        "substance",
        "the",
        "a",
        "of",
        "with",
        "that",
        "is",
    ]
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = [(f"t{i}", " ".join(rng.choice(words) for _ in range(rng.randint(6, 30))),
             classes[i % len(classes)]) for i in range(n)]  # fmt: skip
    with open(root / "unlabeled.csv", "w") as handle:
        handle.write("id,text\n" + "".join(f"{i},{t}\n" for i, t, _ in rows))
    with open(root / "labeled.csv", "w") as handle:
        handle.write(
            "id,text,label\n" + "".join(f"{i},{t},{c}\n" for i, t, c in rows[: 4 * len(classes)])
        )
    return root / "labeled.csv", root / "unlabeled.csv"


def write_fake_labels(path: Path, unlabeled: Path, classes: list[str]) -> None:
    import numpy as np

    from zmdevice.data import open_dataset
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    data = open_dataset(unlabeled)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(len(classes)), size=len(data)).astype(np.float32)
    metadata = build_metadata(
        classes=classes,
        teacher={"spec": "fake"},
        data={"fingerprint": data.fingerprint()},
        top_k=len(classes),
    )
    with PseudoLabelWriter(path, metadata) as writer:
        writer.write_probs(data.ids, probs)


def measure(student_name: str, steps: int, samples: int, precision: str = "auto") -> dict:
    """Run in the child process: train with default batches, timing a bare pass between steps.

    The bare forward+backward runs inside the ``on_step`` callback, right after each
    stage-2 step, on a batch of the same composition built by the same pipeline (outside
    the timed region), with a second student of the same preset. Interleaving the two
    keeps machine noise (other processes, frequency changes) out of the ratio.
    """
    import statistics

    import torch

    from zmdevice.catalog import require_entry
    from zmdevice.config import TrainConfig
    from zmdevice.students import WEIGHTS_FILE, build_student
    from zmdevice.training import checkpoint
    from zmdevice.training.run import run_train

    modality = require_entry(student_name, "student", "--student")["modality"]
    classes = [f"class{i}" for i in range(8 if modality == "text" else 10)]
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if modality == "image":
        labeled, unlabeled = make_image_data(root, samples, classes)
    else:
        labeled, unlabeled = make_text_data(root, samples, classes)
    write_fake_labels(root / "labels.parquet", unlabeled, classes)

    hyper = TrainConfig(labeled=labeled, unlabeled=unlabeled).for_modality(modality)
    n_l, n_u = hyper.labeled_batch_size, hyper.unlabeled_batch_size
    # The same memory layout as training uses, so the ratio compares like with like.
    bare = build_student(student_name, classes, seed=1).train().use_channels_last()
    bare.freeze_word_embeddings()  # as CPU training does (text), so backward does the same work
    step_times: list[float] = []
    bare_times: list[float] = []
    previous_end = None
    used = {}

    def on_step(setup, state, values):
        nonlocal previous_end
        used["precision"] = setup.precision
        now = time.perf_counter()
        if state["stage_index"] != 1:
            return
        if previous_end is not None:
            step_times.append(now - previous_end)
        data = setup.data
        labeled_rows = torch.randint(len(data.labeled_y), (n_l,))
        pool = torch.randint(data.num_pool, (n_u,))
        groups = [("weak", data.labeled_index[labeled_rows]), ("weak", pool), ("strong", pool)]
        inputs = data.views.batch(groups)
        start = time.perf_counter()
        bare.zero_grad(set_to_none=True)
        with setup.precision.autocast():
            logits = bare(**inputs)
        logits.float().logsumexp(dim=1).mean().backward()
        bare_times.append(time.perf_counter() - start)
        if state["step"] == steps:
            checkpoint.save(setup, state)  # the last step is left out of the median anyway
        previous_end = time.perf_counter()

    config = TrainConfig(
        labeled=labeled,
        unlabeled=unlabeled,
        pseudo_labels=root / "labels.parquet",
        student=student_name,
        out=root / "model",
        device="cpu",
        kd_steps=3,
        ssl_steps=steps,
        eval_every=0,
        checkpoint_every=0,
        bn_recalibration_batches=1,
        precision=precision,
    )
    run_train(config, on_step=on_step)
    # The first steps warm up allocator and caches; the last one also evaluates and saves.
    # Means, not medians: image views are built for 4 steps at once, so one step in 4
    # carries the data pipeline's cost and the median would leave it out.
    step = statistics.fmean(step_times[4:-1])
    bare_time = statistics.fmean(bare_times[4:-1])
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    model = root / "model"
    result = {
        "student": student_name,
        "batch": f"{n_l} labeled + {n_u} unlabeled weak + {n_u} unlabeled strong",
        "threads": torch.get_num_threads(),
        "precision": used["precision"].name,
        "precision_reason": used["precision"].reason,
        "step_s": round(step, 4),
        "bare_forward_backward_s": round(bare_time, 4),
        "ratio": round(step / bare_time, 3),
        "ratio_target": TARGETS.get(student_name, (1.10, None))[0],
        "peak_rss_gb": round(rss_gb, 2),
        "rss_target_gb": TARGETS.get(student_name, (None, None))[1],
        "weights_bytes": (model / WEIGHTS_FILE).stat().st_size,
        "resume_checkpoint_bytes": sum(
            path.stat().st_size for path in (model / checkpoint.FOLDER).iterdir()
        ),
    }
    shutil.rmtree(root, ignore_errors=True)  # synthetic data and checkpoints: 0.2-0.3 GB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", action="append", help="student preset (repeatable)")
    parser.add_argument("--steps", type=int, default=30, help="stage-2 steps timed")
    parser.add_argument("--samples", type=int, default=5000, help="synthetic samples")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (training)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    students = args.student or list(TARGETS)
    if args.child:
        print(json.dumps(measure(students[0], args.steps, args.samples, args.precision)))
        return
    results = []
    for name in students:
        command = [sys.executable, __file__, "--child", "--student", name,
                   "--steps", str(args.steps), "--samples", str(args.samples),
                   "--precision", args.precision]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            ratio_target, rss_target = TARGETS.get(name, (1.10, None))
            failure = {"ratio_target": ratio_target, "rss_target_gb": rss_target}
            results.append({"student": name, "error": done.stderr[-2000:], **failure})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ok_ratio = result["ratio"] <= result["ratio_target"]
        ok_rss = result["rss_target_gb"] is None or result["peak_rss_gb"] <= result["rss_target_gb"]
        print(
            f"{name}: stage-2 step {1000 * result['step_s']:.0f} ms vs bare forward+backward "
            f"{1000 * result['bare_forward_backward_s']:.0f} ms ({result['batch']}, "
            f"{result['threads']} threads): ratio {result['ratio']:.2f} "
            f"(target <= {result['ratio_target']}) {'OK' if ok_ratio else 'MISSED'}; "
            f"peak RSS {result['peak_rss_gb']:.2f} GB (target <= {result['rss_target_gb']} GB) "
            f"{'OK' if ok_rss else 'MISSED'}"
        )
        print(json.dumps(result))
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
