"""Fingerprints of tiny training and labeling runs, to prove a refactoring changed no number.

``compute_fingerprints(folder)`` writes small synthetic data sets into ``folder``, runs every
training method on a tiny image and a tiny text student (two seeds, a few steps, one torch
thread) and labels a text table and an image folder with the two tiny test teachers. It
returns two records per run:

``runs``, sha256 fingerprints, compared bit for bit where the reference was recorded (same
torch build and CPU capability), of

- the saved student's tensors (name, dtype, shape and bytes, in sorted name order),
- the deterministic fields of every ``metrics.jsonl`` line (timings dropped, and the
  collapse guard's observations, added after the reference was recorded: they only
  observe, which the unchanged weights prove),
- a label file's ids, hard labels and dense probabilities;

``values``, the numbers behind them, compared with tolerances on other CPU kinds, whose
kernels round differently: those metrics lines themselves, per float tensor its L2 norm and
two fixed random +-1 projections (a change of relative size r in a tensor moves them by
about r times its norm), integer tensors exactly, and a label file's hard labels and
probabilities.

``tests/equivalence_reference.json`` holds the fingerprints of the code before the training
refactoring; ``tests/test_equivalence.py`` recomputes and compares them. Regenerate only for a
change that is meant to alter numbers:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tests/make_equivalence_reference.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

REFERENCE = Path(__file__).with_name("equivalence_reference.json")
METHODS = ("zeromatch", "kd", "supervised", "fixmatch", "adamatch", "naive-pl")
SEEDS = (0, 1)
TIMING_KEYS = ("seconds", "samples_per_s", "elapsed", "time")
GUARD_PREFIX = "guard_"
"""The collapse guard's lines (``training.guard``), which hold nothing else."""
SETTINGS = dict(
    threads=1,
    kd_batch_size=8,
    labeled_batch_size=3,
    unlabeled_batch_size=8,
    eval_batch_size=16,
    eval_every=2,
    log_every=1,
    checkpoint_every=2,
    bn_recalibration_batches=2,
    holdout_fraction=0.2,
    # `auto` measures the candidates on the machine and takes bf16 where the CPU has it: a
    # different computation by choice, not a changed one. The reference ran fp32.
    precision="fp32",
    # The reference was recorded when stage 2 ended on its last weights; the weight average
    # became the default later (a changed default, not a changed computation).
    ssl_weight_average=0.0,
)
VARIANTS = {
    # The options that change the losses, on top of the plain methods.
    "zeromatch-soft-fixmatch-constant-clip": dict(
        method="zeromatch",
        soft_labels=True,
        extra={"ssl_loss": "fixmatch", "alpha": "constant", "grad_clip": 0.5},
    ),
    "naive-pl-soft": dict(method="naive-pl", soft_labels=True, extra={"temperature": 2.0}),
}
TEXT_CLASSES = ["sports", "politics", "science"]
TEXT_WORDS = [["game", "team", "ball"], ["vote", "law", "election"], ["atom", "cell", "experiment"]]
IMAGE_CLASSES = ["red", "green", "blue"]


def environment() -> dict:
    """What the fingerprints depend on besides the code: float maths differs across these.

    The vendor too: MKL, which does torch's matrix products, picks its kernels by vendor as
    well as by instruction set.
    """
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": cpu_vendor(),
    }


def cpu_vendor() -> str:
    """``/proc/cpuinfo``'s vendor_id (GenuineIntel, AuthenticAMD), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tensors_sha256(tensors: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_values(tensors: dict) -> dict:
    """Per tensor: ``[norm, projection, projection]`` of a float one, the list of an integer one.

    The +-1 projection vectors come from a fixed numpy seed per tensor size and the sums
    are float64, so the numbers depend on the weights alone, not on the CPU.
    """
    import numpy as np

    values = {}
    for name in sorted(tensors):
        array = tensors[name].numpy().reshape(-1)
        if not np.issubdtype(array.dtype, np.floating):
            values[name] = array.tolist()
            continue
        array = array.astype(np.float64)
        signs = np.random.default_rng(array.size).integers(0, 2, (2, array.size)) * 2.0 - 1.0
        values[name] = [float(np.sqrt(np.sum(array * array))), *map(float, signs @ array)]
    return values


def metrics_records(out: Path) -> list[dict]:
    records = []
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if any(key.startswith(GUARD_PREFIX) for key in record):
            continue
        records.append({k: v for k, v in record.items() if k not in TIMING_KEYS})
    return records


def run_fingerprint(out: Path) -> tuple[dict, dict]:
    """The run's ``runs`` (sha256) and ``values`` (numbers) records."""
    from safetensors.torch import load_file

    records = metrics_records(out)
    tensors = load_file(str(out / "student.safetensors"))
    fingerprint = {
        "weights": tensors_sha256(tensors),
        "metrics": sha256_json(records),
        "metrics_lines": len(records),
    }
    return fingerprint, {"metrics": records, "weights": tensors_values(tensors)}


def labels_fingerprint(path: Path) -> tuple[dict, dict]:
    """The label file's ``runs`` (sha256) and ``values`` (numbers) records."""
    from zmdevice.pseudolabels import read_pseudolabels

    labels = read_pseudolabels(path)
    probs = labels.dense_probs().astype("float32")
    digest = hashlib.sha256(json.dumps(list(labels.ids)).encode())
    digest.update(labels.label.astype("int64").tobytes())
    digest.update(probs.tobytes())
    values = {
        "ids": sha256_json(list(labels.ids)),
        "label": labels.label.astype("int64").tolist(),
        "probs": probs.astype("float64").tolist(),
    }
    return {"labels": digest.hexdigest()}, values


# --------------------------------------------------------------------------- data


def write_fake_pseudolabels(path: Path, dataset, gold: list[int], classes: list[str]) -> None:
    """A fake FM right ~70% of the time (fixed numpy seed)."""
    import numpy as np

    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    rng = np.random.default_rng(0)
    probs = np.full((len(gold), len(classes)), 0.1, dtype=np.float32)
    for row, label in enumerate(gold):
        guess = label if rng.random() < 0.7 else int(rng.integers(len(classes)))
        probs[row, guess] = 0.8
    probs /= probs.sum(axis=1, keepdims=True)
    metadata = build_metadata(
        classes=classes,
        teacher={"spec": "fake"},
        data={"fingerprint": dataset.fingerprint()},
        top_k=len(classes),
    )
    with PseudoLabelWriter(path, metadata) as writer:
        writer.write_probs(list(dataset.ids), probs)


def make_text_data(root: Path) -> Path:
    import random

    from zmdevice.data import open_dataset

    root.mkdir(parents=True)
    rng = random.Random(0)
    rows = []
    for i in range(40):
        label = i % 3
        words = [
            rng.choice(TEXT_WORDS[label]) if rng.random() < 0.6 else rng.choice(["the", "a", "is"])
            for _ in range(5)
        ]
        rows.append(f"s{i},{' '.join(words)},{TEXT_CLASSES[label]}")
    header = "id,text,label"
    (root / "unlabeled.csv").write_text("\n".join([header, *rows]) + "\n")
    (root / "labeled.csv").write_text("\n".join([header, *rows[:6]]) + "\n")
    (root / "test.csv").write_text("\n".join([header, *rows[:12]]) + "\n")
    unlabeled = open_dataset(root / "unlabeled.csv")
    gold = [i % 3 for i in range(40)]
    write_fake_pseudolabels(root / "labels.parquet", unlabeled, gold, TEXT_CLASSES)
    return root


# Its own data, not test_train's fixtures: the recorded hashes must not move when those change.
def make_image_data(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    from zmdevice.data import open_dataset

    rng = np.random.default_rng(0)
    for i in range(36):
        label = i % 3
        pixels = rng.integers(0, 80, (20, 20, 3)).astype(np.uint8)
        pixels[..., label] += 150
        folders = [root / "unlabeled"]
        if i < 6:
            folders.append(root / "labeled" / IMAGE_CLASSES[label])
        if i < 12:
            folders.append(root / "test" / IMAGE_CLASSES[label])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    unlabeled = open_dataset(root / "unlabeled")
    write_fake_pseudolabels(
        root / "labels.parquet", unlabeled, [i % 3 for i in range(36)], IMAGE_CLASSES
    )
    return root


# --------------------------------------------------------------------------- runs


def train_once(
    root: Path, modality: str, out: Path, method: str, seed: int, **changes
) -> tuple[dict, dict]:
    """One tiny run's records; ``changes`` holds ``soft_labels``, ``extra`` (settings on top
    of ``SETTINGS``) and ``steps`` (``kd_steps`` and ``ssl_steps`` other than 4)."""
    from zmdevice.config import TrainConfig
    from zmdevice.training.run import run_train

    if modality == "image":
        files = dict(labeled=root / "labeled", unlabeled=root / "unlabeled", test=root / "test")
        student = "tiny-mobilenet"
    else:
        files = dict(
            labeled=root / "labeled.csv", unlabeled=root / "unlabeled.csv", test=root / "test.csv"
        )
        student = "tiny-distilbert"
    settings = {**SETTINGS, **changes.get("extra", {})}
    if "extra" in {item.name for item in dataclasses.fields(TrainConfig)}:
        # Before the refactoring the hyper-parameters went in TrainConfig.extra.
        settings = {"extra": settings}
    config = TrainConfig(
        **files,
        pseudo_labels=root / "labels.parquet",
        student=student,
        out=out,
        device="cpu",
        method=method,
        seed=seed,
        soft_labels=changes.get("soft_labels", False),
        **{"kd_steps": 4, "ssl_steps": 4, **changes.get("steps", {})},
        **settings,
    )
    run_train(config)
    return run_fingerprint(out)


def label_runs(folder: Path) -> tuple[dict, dict]:
    """Label a text table with the tiny text-embedding teacher, images with the tiny CLIP."""
    import numpy as np
    import tiny_teachers
    from PIL import Image

    from zmdevice.config import LabelConfig
    from zmdevice.labeling.run import run_label

    embed = tiny_teachers.make_text_embed(folder / "embed")
    texts = folder / "label-texts.csv"
    words = [" ".join(group) for group in TEXT_WORDS] + ["the match", "a vote"]
    rows = [f"t{i:03d},{words[i % 5]} {words[(i * 7) % 5]}" for i in range(20)]
    texts.write_text("\n".join(["id,text", *rows]) + "\n")
    images = folder / "label-images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
    (folder / "clip-model").mkdir()
    clip = tiny_teachers.make_clip_checkpoint(folder / "clip-model")
    jobs = {
        "label/text-embed": (texts, f"text-embed:{embed}"),
        "label/clip": (images, f"clip:zm-tiny-clip:{clip}"),
    }
    runs, values = {}, {}
    for name, (data, teacher) in jobs.items():
        out = folder / f"{name.replace('/', '-')}.parquet"
        run_label(
            LabelConfig(
                data=data,
                classes=",".join(TEXT_CLASSES),
                teacher=teacher,
                out=out,
                batch_size=4,
                device="cpu",
                precision="fp32",  # as SETTINGS: fp32 wherever `auto` would pick
                workers=0,
            )
        )
        runs[name], values[name] = labels_fingerprint(out)
    return runs, values


def compute_fingerprints(folder: Path) -> dict:
    """``{"runs": ..., "values": ...}``, each keyed by ``modality/method/seed`` (and
    ``label/teacher``).

    ``curves.png`` is not drawn: matplotlib takes most of a tiny run's time and the curves
    come from ``metrics.jsonl``, which is fingerprinted.
    """
    from unittest import mock

    import torch

    torch.set_num_threads(1)
    with mock.patch("zmdevice.report.plot_curves", lambda *args, **kwargs: None):
        return all_runs(folder)


def all_runs(folder: Path) -> dict:
    roots = {
        "image": make_image_data(folder / "image-data"),
        "text": make_text_data(folder / "text-data"),
    }
    runs, values = {}, {}
    for modality, root in roots.items():
        for method in METHODS:
            for seed in SEEDS:
                name = f"{modality}/{method}/{seed}"
                out = folder / "runs" / name.replace("/", "-")
                runs[name], values[name] = train_once(root, modality, out, method, seed)
        for variant, changes in VARIANTS.items():
            name = f"{modality}/{variant}/0"
            out = folder / "runs" / name.replace("/", "-")
            changes = dict(changes)
            method = changes.pop("method")
            runs[name], values[name] = train_once(root, modality, out, method, 0, **changes)
    label_records, label_values = label_runs(folder)
    return {"runs": {**runs, **label_records}, "values": {**values, **label_values}}


def main(out: Path = REFERENCE) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = compute_fingerprints(Path(tmp))
    out.write_text(
        json.dumps({"environment": environment(), **records}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {len(records['runs'])} fingerprints to {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    # An optional path: the fingerprints go there instead (tests/test_equivalence.py).
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE)
