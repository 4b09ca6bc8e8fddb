"""zmdevice against what a user would write instead, and against the CPU's arithmetic limit.

Parts (``--parts``, all by default; each can run alone, the JSON keeps the others):

- ``label-text``: ``run_label`` (what ``zmdevice label --teacher minilm`` runs) end to end at
  its defaults, against sentence-transformers ``encode`` + cosine to the class-prompt
  embeddings, in fp32 and after ``.to(torch.bfloat16)``, on the same texts and the same
  local MiniLM files the catalog uses, plus ``--runtime torch`` (is the default runtime the
  faster here?). Wall time from loading the model to the labels; the variants alternate
  round by round in one process (order rotated), best round each.
- ``label-image``: the same for ``--teacher efficientnet-lite0`` against timm + plain
  PyTorch: the same ``tf_efficientnet_lite0`` weights, softmax and the shipped class map.
- ``train``: ``zmdevice.train`` (distilbert, zeromatch, CPU) against SetFit
  (``Trainer.train`` on the MiniLM body) on the same labeled texts; wall times, steps,
  texts through the network, test accuracy. One run each.
- ``inference``: the student just trained, exported; ``zmdevice.load(...).predict`` against
  a plain ``onnxruntime.InferenceSession`` + ``tokenizers`` on the same file and texts (at
  onnxruntime's default threads, and with ``intra_op_num_threads`` = the usable cores).
- ``calibration``: what ``auto``'s measuring costs a default labeling run of 10,000 texts,
  and a rerun with the cached decision, against the same run with the chosen numerics given
  as flags.
- ``hardware``: FLOPs of one batch (``torch.utils.flop_counter.FlopCounterMode``: matrix
  products and convolutions, the convolution backward counted here) of each teacher's
  forward and each student's training step (forward + backward), over the median wall and
  CPU time: achieved FLOP/s against the core's fp32 peak (FMA width x 2 FLOPs x FMA units
  x clock, from /proc/cpuinfo and lscpu).
- ``compile``: ``torch.compile`` (inductor, CPU) of a student's training step and of a
  teacher's forward: compile time, steady-state speed against eager (alternating), max
  abs difference of the outputs and gradients at the same weights and inputs. Each
  model's row is saved as it ends, and runs for other models keep the earlier rows.

Usage (from the repository root; one thread, one pinned core)::

    taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_peers.py --quick
    python benchmarks/bench_peers.py --quick --parts label-text,label-image
    python benchmarks/bench_peers.py --parts compile --compile distilbert minilm

Writes ``benchmarks/peers-performance.json`` (``--json``) with the CPU model, its flags and
the busy share of every core during each part, and prints a Markdown table;
``python benchmarks/performance.py render`` puts it into ``benchmarks/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "default" / "text"
IMAGES = ROOT / "examples" / "default" / "images"
OUT_JSON = ROOT / "benchmarks" / "peers-performance.json"
PARTS = ("label-text", "label-image", "calibration", "train", "inference", "hardware", "compile")
FORMAT = "zmdevice-peers"
PEER_TARGET = 1.2
"""`zmdevice label` at its defaults over the fastest hand-written peer, at least."""
AGREEMENT_TARGET = 0.995
"""Share of labels equal to the peer's (same model, fp32) for the speed to count."""
CALIBRATION_ROUNDS = 3
"""Rounds of the calibration part: measuring run, cached rerun, flags' run."""
FMA_UNITS = 2
"""FMA pipes per core (assumed: AMD Zen 2-4 and Intel server cores since Skylake have 2)."""
IMAGE_PEER_SIZE = 128
"""The image teacher's input size (``models/efficientnet-lite0.toml``), used by the peer."""


# --------------------------------------------------------------------------- the machine


def cpu_facts() -> dict:
    """CPU model, flags, clock and the fp32 (and bf16) peak of one core, with the assumption."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    first: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    try:
        lscpu_text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu_text = ""
    lscpu = {}
    for line in lscpu_text.splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    flags = first.get("flags", lscpu.get("Flags", "")).split()
    # lscpu gives a maximum (boost) clock only where the hypervisor exposes it; otherwise
    # the nominal clock of /proc/cpuinfo is the best figure there is.
    max_mhz = lscpu.get("CPU max MHz")
    mhz = float(max_mhz) if max_mhz else float(first.get("cpu MHz", "0") or 0)
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "AVX2 + FMA"
    else:
        lanes, isa = 4, "SSE"
    fp32_per_cycle = lanes * 2 * FMA_UNITS  # an FMA is 2 FLOPs
    bf16_flags = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if "amx_bf16" in flags:
        bf16_per_cycle = 1024  # Intel's figure for one AMX unit: 1024 bf16 FLOPs per cycle
    elif "avx512_bf16" in flags:
        bf16_per_cycle = 2 * fp32_per_cycle  # VDPBF16PS: 2 bf16 products per fp32 lane
    else:
        bf16_per_cycle = None
    return {
        "model": first.get("model name", lscpu.get("Model name", platform.processor())),
        "family_model_stepping": [
            first.get("cpu family"),
            first.get("model"),
            first.get("stepping"),
        ],
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "flags": flags,
        "bf16_flags": bf16_flags,
        "clock_mhz": mhz,
        "clock_source": "lscpu CPU max MHz" if max_mhz else "/proc/cpuinfo cpu MHz (nominal)",
        "vector_isa": isa,
        "fp32_lanes": lanes,
        "fma_units_assumed": FMA_UNITS,
        "peak_fp32_flops": fp32_per_cycle * mhz * 1e6,
        "peak_bf16_flops": bf16_per_cycle * mhz * 1e6 if bf16_per_cycle else None,
        "peak_assumption": (
            f"{lanes} fp32 lanes ({isa}) x 2 FLOPs per FMA x {FMA_UNITS} FMA units (assumed) "
            f"x {mhz:.0f} MHz ({'lscpu max' if max_mhz else 'nominal, no boost clock exposed'})"
            + ("" if bf16_per_cycle else "; no bf16 instructions: bf16 runs through fp32")
        ),
    }


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy jiffies, total jiffies) from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            idle = values[3] + values[4]  # idle + iowait
            times[name] = (sum(values) - idle, sum(values))
    return times


def busy_shares(before: dict, after: dict) -> dict[str, float]:
    """Busy share of each core between two ``core_times`` readings."""
    shares = {}
    for name, (busy, total) in after.items():
        busy0, total0 = before.get(name, (0, 0))
        shares[name] = round((busy - busy0) / max(total - total0, 1), 3)
    return shares


def process_cpu_s() -> float:
    """CPU seconds of this process and its finished children (loader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def alternate(functions: dict, rounds: int) -> dict[str, list]:
    """Call every function once per round, the order rotated each round; the results."""
    names = list(functions)
    results: dict[str, list] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(functions[name]())
    return results


def read_rows(path: Path, count: int | None = None) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows[:count] if count else rows


def class_prompts(path: Path) -> tuple[list[str], list[str]]:
    """(class names, their prompts) of a ``class = "description"`` TOML file."""
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    return list(table), [str(v) for v in table.values()]


def minilm_folder() -> Path:
    """The local all-MiniLM-L6-v2 folder the catalog's ``minilm`` teacher loads."""
    from zmdevice.catalog import catalog_weights, require_entry

    entry = require_entry("minilm", "teacher", "--teacher")
    return catalog_weights("--teacher minilm", entry["weights_from"])


def file_labels(path: Path, ids: list[str]) -> list[str]:
    """The labels of a pseudo-label file, in the order of ``ids``."""
    from zmdevice.pseudolabels import read_pseudolabels

    stored = read_pseudolabels(path)
    by_id = dict(zip(stored.ids, stored.dense_probs().argmax(1), strict=True))
    return [stored.classes[by_id[i]] for i in ids]


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def label_with_zmdevice(data: Path, classes: Path, teacher: str, out: Path, **flags) -> dict:
    """``run_label`` at its defaults (only the output path and ``flags`` given), timed whole."""
    from zmdevice.config import LabelConfig
    from zmdevice.labeling.run import run_label

    out.unlink(missing_ok=True)
    config = LabelConfig(data=data, classes=str(classes), teacher=teacher, out=out, **flags)
    started = time.perf_counter()
    summary = run_label(config)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "summary": summary}


# --------------------------------------------------------------------------- labeling


def part_label_text(args, work: Path) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    rows = read_rows(TEXT / "unlabeled.csv", args.texts)
    ids, texts = [r["id"] for r in rows], [r["text"] for r in rows]
    subset = work / "texts.csv"
    with open(subset, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(zip(ids, texts, strict=True))
    classes = TEXT / "classes.toml"
    names, prompts = class_prompts(classes)
    folder = minilm_folder()

    def zmdevice_run(**flags):
        def run():
            out = work / "texts-labels.parquet"
            done = label_with_zmdevice(subset, classes, "minilm", out, **flags)
            summary = done["summary"]
            return {
                "wall_s": done["wall_s"],
                "pass_s": summary["count"] / summary["samples_per_s"],
                "labels": file_labels(out, ids),
                "ran": f"{summary['precision']}, {summary['runtime']}",
            }

        return run

    def peer(dtype):
        def run():
            started = time.perf_counter()
            model = SentenceTransformer(str(folder), device="cpu")
            if dtype is not None:
                model.to(dtype)
            loaded = time.perf_counter()
            centroids = model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True)
            embeddings = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
            predicted = (embeddings.float() @ centroids.float().T).argmax(1).tolist()
            done = time.perf_counter()
            return {
                "wall_s": done - started,
                "pass_s": done - loaded,
                "labels": [names[i] for i in predicted],
                "ran": "fp32" if dtype is None else "bf16 weights",
            }

        return run

    # Warm-up, untimed: the teacher's ONNX cache, the file cache of the weights, imports.
    label_with_zmdevice(subset, classes, "minilm", work / "warm.parquet")
    SentenceTransformer(str(folder), device="cpu").encode(texts[:8])
    variants = {
        "zmdevice label (defaults)": zmdevice_run(),
        # Not a peer: whether the default runtime is the faster one here.
        "zmdevice label --runtime torch": zmdevice_run(runtime="torch"),
        "sentence-transformers fp32": peer(None),
        "sentence-transformers bf16": peer(torch.bfloat16),
    }
    reference = "sentence-transformers fp32"
    return labeling_result("minilm", variants, len(texts), args.rounds, reference)


def label_in_new_process(data: Path, classes: Path, teacher: str, out: Path, **flags) -> dict:
    """``zmdevice label`` at its defaults (only the output path and ``flags`` given) as a
    user runs it, in a process of its own, timed whole (the imports and each first-call
    cost included, as every command pays them); the file's teacher record read back."""
    from zmdevice.pseudolabels import read_pseudolabel_metadata

    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "zmdevice", "label", str(data), "--classes", str(classes),
               "--teacher", teacher, "--out", str(out)]  # fmt: skip
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "teacher": read_pseudolabel_metadata(out)["teacher"]}


def part_calibration(args, work: Path) -> dict:
    """What ``auto``'s measuring costs a default labeling run: ``--calibration-texts`` texts
    (the default text data repeated under new ids) labeled with an empty cache (it measures
    the candidates, exporting the ONNX ones it can pay for), then twice each, alternating,
    again (the cached decision) and with the chosen numerics given as flags (nothing
    measured: the baseline), ``CALIBRATION_ROUNDS`` times; each run a ``zmdevice label``
    process of its own (in one process, the first run also paid the imports and first
    calls the later ones skipped: 6 s of a 38 s run), its whole wall time, each side's best
    compared; and the seconds the measuring run itself reports spending (``seconds`` of its
    calibration record), a share of the same baseline."""
    rows = read_rows(TEXT / "unlabeled.csv")
    subset = work / "calibration-texts.csv"
    with open(subset, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for i in range(args.calibration_texts):
            row = rows[i % len(rows)]
            writer.writerow([f"{row['id']}-{i // len(rows)}", row["text"]])
    classes, out = TEXT / "classes.toml", work / "calibration-labels.parquet"
    cache = work / "calibration-cache"
    before = os.environ.get("ZMDEVICE_CACHE")
    os.environ["ZMDEVICE_CACHE"] = str(cache)
    # Rounds of a measuring run (an empty cache: nothing measured or exported before), a
    # cached rerun and the flags' run, alternating: each side's best is compared, so none
    # gains from being timed more often or later.
    measuring_runs, cached_runs, baselines = [], [], []
    try:
        for _ in range(CALIBRATION_ROUNDS):
            shutil.rmtree(cache, ignore_errors=True)
            measuring_runs.append(label_in_new_process(subset, classes, "minilm", out))
            chosen = {k: measuring_runs[0]["teacher"][k] for k in ("precision", "runtime")}
            cached_runs.append(label_in_new_process(subset, classes, "minilm", out))
            flagged = label_in_new_process(subset, classes, "minilm", out, **chosen)
            baselines.append(flagged["wall_s"])
    finally:
        if before is None:
            os.environ.pop("ZMDEVICE_CACHE", None)
        else:
            os.environ["ZMDEVICE_CACHE"] = before
    measuring = min(measuring_runs, key=lambda run: run["wall_s"])
    cached = min(cached_runs, key=lambda run: run["wall_s"])
    baseline = min(baselines)
    records = [run["teacher"].get("calibration") or {} for run in measuring_runs]
    again = cached["teacher"].get("calibration")
    return {
        "teacher": "minilm",
        "items": args.calibration_texts,
        "chosen": chosen,
        "calibration": measuring["teacher"].get("calibration"),
        "chosen_each_round": [record.get("chosen") for record in records],
        "measuring_seconds_each_round": [record.get("seconds") for record in records],
        "cached_record": bool(again and again.get("cached")),
        "measuring_wall_s": measuring["wall_s"],
        "measuring_walls_s": [run["wall_s"] for run in measuring_runs],
        "cached_wall_s": cached["wall_s"],
        "cached_walls_s": [run["wall_s"] for run in cached_runs],
        "baseline_wall_s": baseline,
        "baseline_walls_s": baselines,
        "measuring_cost_share": (measuring["wall_s"] - baseline) / baseline,
        "measuring_seconds_share": min(r.get("seconds") or 0.0 for r in records) / baseline,
        "cached_cost_share": (cached["wall_s"] - baseline) / baseline,
        "target_share": 0.05,
    }


def part_label_image(args, work: Path) -> dict:
    import timm
    import torch
    from PIL import Image
    from timm.data import ImageNetInfo
    from torchvision import transforms

    from zmdevice.catalog import catalog_dir, catalog_weights, require_entry

    paths = sorted((IMAGES / "unlabeled").rglob("*.png"))[: args.images]
    subset = work / "images"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir()
    for path in paths:
        shutil.copyfile(path, subset / path.name)
    ids = [p.name for p in paths]
    classes = IMAGES / "classes.toml"
    names, _ = class_prompts(classes)
    entry = require_entry("efficientnet-lite0", "teacher", "--teacher")
    weights = catalog_weights("--teacher efficientnet-lite0", entry["weights_from"])
    class_map = json.loads((catalog_dir() / entry["maps"][0]).read_text())["map"]

    def zmdevice_run():
        out = work / "images-labels.parquet"
        run = label_with_zmdevice(subset, classes, "efficientnet-lite0", out)
        summary = run["summary"]
        return {
            "wall_s": run["wall_s"],
            "pass_s": summary["count"] / summary["samples_per_s"],
            "labels": file_labels(out, ids),
            "ran": f"{summary['precision']}, {summary['runtime']}",
        }

    def peer():
        started = time.perf_counter()
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # The pip package's tensor names differ from timm's; the tensors come in timm's order.
        own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        theirs = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
        model.load_state_dict(dict(zip(own, theirs, strict=True)), strict=False)
        model.eval()
        info = ImageNetInfo()
        index = {}
        for i in range(info.num_classes()):
            for synonym in info.index_to_description(i).split(","):
                index.setdefault(synonym.strip().lower(), i)
        mapping = torch.zeros(info.num_classes(), len(names))
        for column, name in enumerate(names):
            for source in class_map[name]:
                mapping[index[source.lower()], column] = 1.0
        preprocess = transforms.Compose(
            [
                transforms.Resize((IMAGE_PEER_SIZE, IMAGE_PEER_SIZE)),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )
        loaded = time.perf_counter()
        predicted = []
        with torch.inference_mode():
            for start in range(0, len(paths), 64):
                batch = torch.stack(
                    [preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + 64]]
                )
                predicted += (model(batch).softmax(-1) @ mapping).argmax(1).tolist()
        done = time.perf_counter()
        return {
            "wall_s": done - started,
            "pass_s": done - loaded,
            "labels": [names[i] for i in predicted],
            "ran": "fp32, torch eager",
        }

    label_with_zmdevice(subset, classes, "efficientnet-lite0", work / "warm.parquet")
    peer()  # warm-up, untimed
    variants = {"zmdevice label (defaults)": zmdevice_run, "timm + PyTorch fp32": peer}
    return labeling_result(
        "efficientnet-lite0", variants, len(paths), args.rounds, "timm + PyTorch fp32"
    )


def labeling_result(teacher: str, variants: dict, items: int, rounds: int, reference: str):
    """Run the variants alternately; per variant its best round, ratios and agreement."""
    results = alternate(variants, rounds)
    ours = "zmdevice label (defaults)"
    best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in results.items()}
    rows = []
    for name, run in best.items():
        rows.append(
            {
                "variant": name,
                "ran": run["ran"],
                "items_per_s": items / run["wall_s"],
                "pass_items_per_s": items / run["pass_s"],
                "wall_s_rounds": [round(r["wall_s"], 2) for r in results[name]],
                "agreement_with_zmdevice": agreement(run["labels"], best[ours]["labels"]),
                "agreement_with_reference": agreement(run["labels"], best[reference]["labels"]),
            }
        )
    by_name = {r["variant"]: r for r in rows}
    for row in rows:
        row["zmdevice_over_this"] = by_name[ours]["items_per_s"] / row["items_per_s"]
        row["zmdevice_over_this_pass"] = by_name[ours]["pass_items_per_s"] / row["pass_items_per_s"]
    peers = [r for r in rows if not r["variant"].startswith("zmdevice")]
    fastest = max(peers, key=lambda r: r["items_per_s"])
    return {
        "teacher": teacher,
        "items": items,
        "rounds": rounds,
        "reference": reference,
        "variants": rows,
        "fastest_peer": fastest["variant"],
        "ratio_to_fastest_peer": fastest["zmdevice_over_this"],
        "target": PEER_TARGET,
        "agreement_target": AGREEMENT_TARGET,
    }


# --------------------------------------------------------------------------- training


def train_zmdevice(args, work: Path):
    """``zmdevice.train`` (distilbert, zeromatch, CPU) on the default texts: (student, wall s).

    Its pseudo-labels (minilm on the 2,000 unlabeled texts) are made first, untimed."""
    import zmdevice

    labels_file = work / "train-labels.parquet"
    if not labels_file.is_file():
        label_with_zmdevice(TEXT / "unlabeled.csv", TEXT / "classes.toml", "minilm", labels_file)
    out = work / "student"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    student = zmdevice.train(
        TEXT / "labeled.csv", TEXT / "unlabeled.csv", labels_file, student="distilbert",
        out=out, device="cpu", kd_steps=args.kd_steps, ssl_steps=args.ssl_steps, progress=False,
    )  # fmt: skip
    return student, time.perf_counter() - started


def part_train(args, work: Path) -> dict:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from zmdevice.config import TrainConfig

    train_rows = read_rows(TEXT / "labeled.csv")
    test_rows = read_rows(TEXT / "test.csv")
    test_texts, test_labels = [r["text"] for r in test_rows], [r["label"] for r in test_rows]

    started = time.perf_counter()
    model = SetFitModel.from_pretrained(str(minilm_folder()))
    setfit_args = TrainingArguments(
        batch_size=args.setfit_batch, max_steps=args.setfit_steps, num_epochs=1,
        report_to="none", save_strategy="no", eval_strategy="no", seed=0,
    )  # fmt: skip
    dataset = Dataset.from_dict(
        {"text": [r["text"] for r in train_rows], "label": [r["label"] for r in train_rows]}
    )
    Trainer(model=model, args=setfit_args, train_dataset=dataset).train()
    setfit_wall = time.perf_counter() - started
    setfit_accuracy = agreement(list(model.predict(test_texts)), test_labels)
    del model

    student, zmdevice_wall = train_zmdevice(args, work)
    test = list(zip(test_texts, test_labels, strict=True))
    zmdevice_accuracy = student.evaluate(test)["accuracy"]
    hyper = TrainConfig(labeled=TEXT / "labeled.csv", unlabeled=TEXT / "unlabeled.csv")
    hyper = hyper.for_modality("text")
    ssl_batch = hyper.labeled_batch_size + 2 * hyper.unlabeled_batch_size
    zmdevice_texts = args.kd_steps * hyper.kd_batch_size + args.ssl_steps * ssl_batch
    setfit_texts = args.setfit_steps * args.setfit_batch * 2  # pairs: two texts each
    return {
        "data": "examples/default/text: 32 labeled, 2000 unlabeled (zmdevice), 400 test",
        "zmdevice": {
            "what": "zmdevice.train, distilbert from MiniLM, zeromatch, on the minilm "
            "pseudo-labels of the 2000 unlabeled texts (labeled before, untimed)",
            "steps": f"{args.kd_steps} KD + {args.ssl_steps} SSL",
            "batch": f"KD {hyper.kd_batch_size}; SSL {ssl_batch}",
            "wall_s": zmdevice_wall,
            "texts_through_network": zmdevice_texts,
            "test_accuracy": zmdevice_accuracy,
        },
        "setfit": {
            "what": "SetFit Trainer.train on the MiniLM body (contrastive pairs of the 32 "
            "labeled texts, then the logistic-regression head)",
            "steps": f"{args.setfit_steps} (batch {args.setfit_batch} pairs)",
            "wall_s": setfit_wall,
            "texts_through_network": setfit_texts,
            "test_accuracy": setfit_accuracy,
        },
        "wall_ratio_setfit_over_zmdevice": setfit_wall / zmdevice_wall,
        "texts_per_s_ratio": (zmdevice_texts / zmdevice_wall) / (setfit_texts / setfit_wall),
    }


# --------------------------------------------------------------------------- inference


def part_inference(args, work: Path, student_dir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import zmdevice

    onnx_file = zmdevice.export(student_dir, out=work / "student.onnx")
    texts = [r["text"] for r in read_rows(TEXT / "test.csv")]
    classifier = zmdevice.load(onnx_file)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    # What a user who reads onnxruntime's tuning guide writes on a one-core budget.
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    tuned = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(onnx_file.with_suffix(".tokenizer.json")))
    meta = session.get_modelmeta().custom_metadata_map
    preprocess = json.loads(meta["zmdevice.preprocess"])
    names = json.loads(meta["zmdevice.classes"])
    tokenizer.enable_truncation(max_length=int(preprocess["max_length"]))
    tokenizer.enable_padding(pad_id=int(preprocess.get("pad_token_id", 0)))
    batch = 32

    def ours():
        started = time.perf_counter()
        labels = list(classifier.predict(texts))
        return time.perf_counter() - started, labels

    def peer(runner):
        def run():
            started = time.perf_counter()
            labels = []
            for start in range(0, len(texts), batch):
                encoded = tokenizer.encode_batch(texts[start : start + batch])
                feed = {
                    "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                }
                logits = runner.run(None, feed)[0]
                labels += [names[i] for i in logits.argmax(1)]
            return time.perf_counter() - started, labels

        return run

    variants = {"zmdevice": ours, "onnxruntime": peer(session), "onnxruntime tuned": peer(tuned)}
    for function in variants.values():
        function()  # warm-up
    results = alternate(variants, args.rounds + 1)
    rate = {k: len(texts) / statistics.median(s for s, _ in v) for k, v in results.items()}
    return {
        "model": "the distilbert student of the train part, exported fp32 (zmdevice.export)",
        "items": len(texts),
        "batch": batch,
        "rounds": args.rounds + 1,
        "zmdevice_items_per_s": rate["zmdevice"],
        "onnxruntime_items_per_s": rate["onnxruntime"],
        "ratio": rate["zmdevice"] / rate["onnxruntime"],
        "agreement": agreement(results["zmdevice"][0][1], results["onnxruntime"][0][1]),
        "tuned_threads": options.intra_op_num_threads,
        "tuned_items_per_s": rate["onnxruntime tuned"],
        "ratio_to_tuned": rate["zmdevice"] / rate["onnxruntime tuned"],
        "optimum": args.optimum_note,
    }


# --------------------------------------------------------------------------- hardware


def teacher_batch(name: str, count: int = 64):
    """(fp32 torch teacher, its default-runtime twin, one collated batch of real data)."""
    from zmdevice.classes import load_classes
    from zmdevice.data import open_dataset
    from zmdevice.teachers import build_teacher

    text = name == "minilm"
    data = open_dataset(TEXT / "unlabeled.csv" if text else IMAGES / "unlabeled")
    classes = load_classes(str((TEXT if text else IMAGES) / "classes.toml"))
    eager = build_teacher(name, classes, device="cpu", precision="fp32", runtime="torch")
    default = build_teacher(name, classes, device="cpu", precision="auto", runtime="auto")
    raw = [data.texts[i] if text else data.load_image(i) for i in range(count)]
    return eager, default, eager.collate([eager.prepare(x) for x in raw])


def network_inputs(name: str, batch) -> tuple:
    return (batch["input_ids"], batch["attention_mask"]) if name == "minilm" else (batch,)


def student_setup(name: str, seed: int = 0):
    """(student in train mode, AdamW, one stage-2-sized batch of synthetic inputs)."""
    import torch
    from bench_precision import synthetic_batch  # benchmarks/ is the script's folder

    from zmdevice.students import build_student

    student = build_student(name, [f"class_{i}" for i in range(10)], seed=seed)
    student.use_channels_last()
    student.freeze_word_embeddings()
    inputs = synthetic_batch(student)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    return student, optimizer, inputs


def training_step(model, optimizer, inputs):
    """Forward + backward + AdamW step; returns the logits (detached)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(**inputs)
    logits.float().logsumexp(dim=1).mean().backward()
    optimizer.step()
    return logits.detach()


def timed(function, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``function()`` over ``repeats`` calls after a warm-up.

    CPU seconds are this process's (all its threads): on a core shared with other work,
    FLOPs per CPU second show the arithmetic rate of the code, per wall second what the
    user waited."""
    function()
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return statistics.median(wall), statistics.median(cpu)


def flop_row(what: str, batch: str, flops: int, seconds: tuple[float, float], facts: dict,
             dtype: str = "fp32"):  # fmt: skip
    """One row; its share is of the peak of the dtype the products ran in (``dtype``)."""
    wall, cpu = seconds
    peak = facts[f"peak_{dtype}_flops"]
    return {
        "what": what,
        "batch": batch,
        "flops": flops,
        "seconds": wall,
        "cpu_seconds": cpu,
        "peak": dtype,
        "achieved_flops": flops / wall,
        "share_of_peak": flops / wall / peak,
        "achieved_flops_per_cpu_s": flops / cpu,
        "share_of_peak_per_cpu_s": flops / cpu / peak,
    }


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *rest, **_) -> int:
    """FLOPs of ``aten.convolution_backward``: one forward convolution's worth for each of
    the input and the weight gradient asked for. torch's own formula (2.14) ignores the
    groups for the weight gradient and counts a depthwise convolution's ``groups`` times
    over (a 64-channel depthwise layer: backward 65x its forward instead of 2x)."""
    transposed, output_mask = rest[4], rest[7]  # aten.convolution_backward's argument order
    per_gradient = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return per_gradient * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter():
    """``FlopCounterMode`` with the grouped-convolution backward counted right."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten.convolution_backward: conv_backward_flops}
    return FlopCounterMode(display=False, custom_mapping=custom)


def part_hardware(args, facts: dict) -> dict:
    import torch

    rows = []
    bf16 = facts["peak_bf16_flops"] is not None
    for name in args.teachers:
        eager, default, batch = teacher_batch(name)
        module, inputs = eager.network.module, network_inputs(name, batch)
        with torch.inference_mode(), flop_counter() as counter:
            module(*inputs)
        flops = counter.get_total_flops()
        shape = "x".join(str(d) for d in (inputs[0].shape))
        eager_s = timed(lambda e=eager, b=batch: e.predict_proba(b), args.repeats)
        default_s = timed(lambda d=default, b=batch: d.predict_proba(b), args.repeats)
        precision = default.info["precision"]
        dtype = "bf16" if precision == "bf16" else "fp32"
        what = f"{name} teacher forward"
        rows += [
            flop_row(f"{what}, torch fp32 eager", shape, flops, eager_s, facts),
            flop_row(f"{what}, default ({precision}, {default.info['runtime']})", shape, flops,
                     default_s, facts, dtype),
        ]  # fmt: skip
    for name in args.students:
        student, optimizer, inputs = student_setup(name)
        with flop_counter() as counter:
            optimizer.zero_grad(set_to_none=True)
            student(**inputs).float().logsumexp(dim=1).mean().backward()
        flops = counter.get_total_flops()
        shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
        # bf16 autocast where the CPU computes bf16 natively: the other peak to compare with.
        for dtype in ("fp32", "bf16") if bf16 else ("fp32",):
            autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16")
            with autocast:
                seconds = timed(lambda s=student, o=optimizer, x=inputs: training_step(s, o, x),
                                args.repeats)  # fmt: skip
            what = f"{name} student training step (fwd + bwd + AdamW), {dtype}"
            rows.append(flop_row(what, shape, flops, seconds, facts, dtype))
        del student, optimizer
    return {
        "peak_fp32_flops": facts["peak_fp32_flops"],
        "peak_bf16_flops": facts["peak_bf16_flops"],
        "peak_assumption": facts["peak_assumption"],
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode: matrix products and "
        "convolutions, 2 FLOPs per multiply-add; elementwise work not counted; the "
        "convolution backward counted here (torch's formula counts a grouped convolution's "
        "weight gradient groups times over)",
        "repeats": args.repeats,
        "rows": rows,
    }


# --------------------------------------------------------------------------- torch.compile


def part_compile(args, on_row) -> dict:
    """One row per name of ``args.compile``; ``on_row(result so far)`` after each, so that
    a run stopped by its time limit keeps the rows it finished."""
    import torch
    import torch._inductor.config as inductor_config

    from zmdevice.teachers import teacher_modality

    # Dropout in the students: eager's random numbers in the compiled graph too, so that the
    # two outputs are comparable (fused random numbers would differ by design).
    inductor_config.fallback_random = True
    result = {
        "backend": "inductor (torch.compile defaults), CPU",
        "fallback_random": True,
        "rows": [],
    }
    for name in args.compile:
        try:
            is_teacher = bool(teacher_modality(name))
        except Exception:  # not a teacher name: a student preset
            is_teacher = False
        started, cpu_started, before = time.perf_counter(), process_cpu_s(), core_times()
        try:
            row = compile_teacher(name, args) if is_teacher else compile_student(name, args)
        except Exception as error:  # inductor needs a C++ compiler, headers, ...
            row = {"what": name, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
        wall = time.perf_counter() - started
        row.update(
            name=name,
            command=args.command,
            wall_s=round(wall, 1),
            own_cpu_share=round((process_cpu_s() - cpu_started) / wall, 3),
            core_busy_share=busy_shares(before, core_times()),
        )
        result["rows"].append(row)
        on_row(result)
        torch._dynamo.reset()
    return result


def compile_student(name: str, args) -> dict:
    import torch

    eager, eager_optimizer, inputs = student_setup(name)
    twin, twin_optimizer, _ = student_setup(name)
    twin.load_state_dict(eager.state_dict())  # the same weights, whatever the seeds did
    compiled = torch.compile(twin)

    def first_pass(model):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        logits = model(**inputs)
        logits.float().logsumexp(dim=1).mean().backward()
        return logits.detach()

    # Same weights, same inputs, same random numbers: compare before any step.
    eager_logits = first_pass(eager)
    started = time.perf_counter()
    compiled_logits = first_pass(compiled)
    first_call = time.perf_counter() - started
    grad_diff = max(
        (a.grad - b.grad).abs().max().item()
        for a, b in zip(eager.parameters(), twin.parameters(), strict=True)
        if a.grad is not None
    )
    steps = {
        "eager": lambda: training_step(eager, eager_optimizer, inputs),
        "compiled": lambda: training_step(compiled, twin_optimizer, inputs),
    }
    return compare(f"{name} student training step (fwd + bwd + AdamW), fp32", steps,
                   first_call, eager_logits, compiled_logits, grad_diff, args.repeats)  # fmt: skip


def compile_teacher(name: str, args) -> dict:
    import torch

    eager_teacher, _, batch = teacher_batch(name)
    module, inputs = eager_teacher.network.module, network_inputs(name, batch)
    compiled = torch.compile(module)
    with torch.no_grad():
        eager_out = module(*inputs)
        started = time.perf_counter()
        compiled_out = compiled(*inputs)
        first_call = time.perf_counter() - started

    def run(model):
        def call():
            with torch.no_grad():
                return model(*inputs)

        return call

    row = compare(f"{name} teacher forward, fp32 (batch of 64 real samples, fixed shape)",
                  {"eager": run(module), "compiled": run(compiled)}, first_call, eager_out,
                  compiled_out, None, args.repeats)  # fmt: skip
    row["labels_equal"] = bool((eager_out.argmax(-1) == compiled_out.argmax(-1)).all())
    return row


def compare(what, steps, first_call, eager_out, compiled_out, grad_diff, repeats) -> dict:
    """Alternate eager and compiled calls; the medians, the ratio and the differences."""
    results = alternate({k: lambda f=f: timed_once(f) for k, f in steps.items()}, repeats + 1)
    medians = {k: statistics.median(v[1:]) for k, v in results.items()}
    return {
        "what": what,
        "first_call_s": first_call,
        "compile_s": first_call - medians["compiled"],
        "eager_s": medians["eager"],
        "compiled_s": medians["compiled"],
        "speedup": medians["eager"] / medians["compiled"],
        "max_abs_output_diff": (eager_out.float() - compiled_out.float()).abs().max().item(),
        "max_abs_output": eager_out.float().abs().max().item(),
        "max_abs_grad_diff": grad_diff,
        "repeats": repeats,
    }


def timed_once(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The results as one Markdown table (what ``performance.py`` renders, shorter)."""
    lines = ["| part | what | zmdevice | peer / reference | ratio | agreement / diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    parts = report["parts"]
    for key in ("label-text", "label-image"):
        if key not in parts:
            continue
        result = parts[key]["result"]
        ours = result["variants"][0]
        for row in result["variants"][1:]:
            lines.append(
                f"| {key} | {row['variant']} ({row['ran']}), {result['items']} items, "
                f"items/s end to end | {ours['items_per_s']:.1f} ({ours['ran']}) | "
                f"{row['items_per_s']:.1f} | {row['zmdevice_over_this']:.2f}x | "
                f"{100 * row['agreement_with_zmdevice']:.2f}% |"
            )
    if "train" in parts:
        r = parts["train"]["result"]
        z, s = r["zmdevice"], r["setfit"]
        lines.append(
            f"| train | wall s ({z['steps']} vs SetFit {s['steps']}); test acc | "
            f"{z['wall_s']:.1f}; {100 * z['test_accuracy']:.1f}% | {s['wall_s']:.1f}; "
            f"{100 * s['test_accuracy']:.1f}% | {r['wall_ratio_setfit_over_zmdevice']:.2f}x | |"
        )
    if "inference" in parts:
        r = parts["inference"]["result"]
        lines.append(
            f"| inference | exported student, {r['items']} texts, items/s | "
            f"{r['zmdevice_items_per_s']:.1f} | {r['onnxruntime_items_per_s']:.1f} | "
            f"{r['ratio']:.2f}x | {100 * r['agreement']:.2f}% |"
        )
        if "tuned_items_per_s" in r:
            lines.append(
                f"| inference | the same, onnxruntime intra_op_num_threads="
                f"{r['tuned_threads']} | {r['zmdevice_items_per_s']:.1f} | "
                f"{r['tuned_items_per_s']:.1f} | {r['ratio_to_tuned']:.2f}x | |"
            )
    if "calibration" in parts:
        r = parts["calibration"]["result"]
        for what, key in (("measuring", "measuring"), ("cached rerun", "cached")):
            lines.append(
                f"| calibration | {r['items']} texts, {what}: wall s vs the chosen numerics "
                f"as flags | {r[f'{key}_wall_s']:.1f} | {r['baseline_wall_s']:.1f} | "
                f"{100 * r[f'{key}_cost_share']:+.1f}% | |"
            )
    if "hardware" in parts:
        result = parts["hardware"]["result"]
        for row in result["rows"]:
            peak = result[f"peak_{row['peak']}_flops"]
            lines.append(
                f"| hardware | {row['what']} ({row['batch']}), GFLOP/s | "
                f"{row['achieved_flops'] / 1e9:.1f} | {row['peak']} peak {peak / 1e9:.1f} | "
                f"{100 * row['share_of_peak']:.1f}% of peak; per CPU s "
                f"{100 * row['share_of_peak_per_cpu_s']:.1f}% | |"
            )
    if "compile" in parts:
        for row in parts["compile"]["result"]["rows"]:
            if "error" in row:
                lines.append(f"| compile | {row['what']} | failed: {row['error'][:200]} | | | |")
                continue
            lines.append(
                f"| compile | {row['what']}: s per call (compile {row['compile_s']:.0f} s) | "
                f"{row['compiled_s']:.3f} compiled | {row['eager_s']:.3f} eager | "
                f"{row['speedup']:.2f}x | {row['max_abs_output_diff']:.1e} |"
            )
    return "\n".join(lines)


def optimum_note() -> str:
    """Whether optimum's onnxruntime classes are importable here, and why not."""
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        return (
            "optimum not used: `pip install optimum` adds only optimum's core (its "
            "onnxruntime classes moved to optimum-onnx, which would downgrade transformers "
            "5.x to 4.57 and tokenizers here), and ORTModel reads a Hugging Face model folder, "
            "not an exported zmdevice file; a user runs that file with a plain "
            "onnxruntime.InferenceSession + tokenizers, the peer measured"
        )
    return "optimum.onnxruntime importable; the peer is a plain InferenceSession all the same"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (a few minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ",".join(PARTS))
    parser.add_argument("--texts", type=int, help="texts labeled (default 2000; quick 256)")
    parser.add_argument("--images", type=int, help="images labeled (default 1000; quick 128)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3; quick 2)")
    parser.add_argument("--kd-steps", type=int, help="zmdevice KD steps (150; quick 15)")
    parser.add_argument("--ssl-steps", type=int, help="zmdevice SSL steps (150; quick 15)")
    parser.add_argument("--setfit-steps", type=int, help="SetFit steps (300; quick 30)")
    parser.add_argument("--setfit-batch", type=int, default=16, help="SetFit pairs per step")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (5; quick 3)")
    parser.add_argument(
        "--calibration-texts", type=int, help="texts of the calibration part (10000; quick 7000)"
    )
    parser.add_argument("--teachers", nargs="*", default=["minilm", "efficientnet-lite0"])
    parser.add_argument(
        "--students", nargs="*", default=["distilbert", "efficientnet_lite0", "mobilenet_v3_small"]
    )
    parser.add_argument(
        "--compile", nargs="*", default=["efficientnet_lite0", "minilm"],
        help="students (training step) and teachers (forward) to torch.compile",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=OUT_JSON)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "texts": (2000, 256), "images": (1000, 128), "rounds": (3, 2), "kd_steps": (150, 15),
        "ssl_steps": (150, 15), "setfit_steps": (300, 30), "repeats": (5, 3),
        # Quick: still above the batches a run needs before it measures (100 of 64).
        "calibration_texts": (10000, 7000),
    }  # fmt: skip
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))  # this checkout's zmdevice
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    args.optimum_note = optimum_note()
    facts = cpu_facts()
    report = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if report.get("format") != FORMAT:
        report = {"format": FORMAT, "parts": {}}
    report.update(
        cpu=facts,
        threads=torch.get_num_threads(),
        thread_env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                    if k in os.environ},
        affinity=sorted(os.sched_getaffinity(0)),
        versions={p: version(p) for p in ("zmdevice", "torch", "transformers",
                  "sentence-transformers", "setfit", "timm", "onnxruntime", "optimum")},
    )  # fmt: skip
    given = " ".join(sys.argv[1:] if argv is None else argv)
    pinned = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    variables = " ".join(f"{k}={v}" for k, v in report["thread_env"].items())
    command = f"taskset -c {pinned} env {variables} python benchmarks/bench_peers.py {given}"
    args.command = command
    student_dir = work / "student"
    for part in parts:
        print(f"[peers] {part} ...", flush=True)
        before, load_before, started = core_times(), os.getloadavg(), time.perf_counter()
        cpu_before = process_cpu_s()
        if part == "label-text":
            result = part_label_text(args, work)
        elif part == "label-image":
            result = part_label_image(args, work)
        elif part == "calibration":
            result = part_calibration(args, work)
        elif part == "train":
            result = part_train(args, work)
        elif part == "inference":
            if not (student_dir / "config.json").is_file():  # no train part before: a short one
                args.kd_steps, args.ssl_steps = 2, 2
                train_zmdevice(args, work)
            result = part_inference(args, work, student_dir)
        elif part == "hardware":
            result = part_hardware(args, facts)
        else:
            # Rows of other models from earlier runs stay; this run's replace their own.
            earlier = report["parts"].get(part, {}).get("result", {}).get("rows", [])
            kept = [r for r in earlier if r.get("name") not in args.compile]

            def on_row(so_far, kept=kept, part=part):
                partial = {**so_far, "rows": kept + so_far["rows"]}
                report["parts"][part] = {"command": command, "partial": True, "result": partial}
                args.json.write_text(json.dumps(report, indent=2) + "\n")

            result = part_compile(args, on_row)
            result["rows"] = kept + result["rows"]
        report["parts"][part] = {
            "command": command,
            "mode": "quick" if quick else "full",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),
            "core_busy_share": busy_shares(before, core_times()),
            # Below 1: other processes on the same core took the rest of the wall time.
            "own_cpu_share": round(
                (process_cpu_s() - cpu_before) / (time.perf_counter() - started), 3
            ),
            "load_average_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "git": git_state(),
            "result": result,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")  # each part as it ends
        print(f"[peers] {part} done in {report['parts'][part]['wall_s']} s", flush=True)
    print(markdown(report))
    print(f"[peers] wrote {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def git_state() -> dict | None:
    """The commit and the modified tracked files measured (read-only git queries)."""

    def query(*args):
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.rstrip() if done.returncode == 0 else None

    try:
        commit, status = query("rev-parse", "HEAD"), query("status", "--porcelain", "-uno")
    except OSError:
        return None
    return {"commit": commit, "modified": [line[3:] for line in (status or "").splitlines()]}


def version(package: str) -> str | None:
    import importlib.metadata as metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
