"""Export benchmark: ONNX vs PyTorch latency, int8 size and accuracy, predict cold start.

For each student (mobilenet_v3_small, distilbert) it trains a real student briefly on the
embedded default data (examples/default: Fashion-MNIST images, WordNet definitions;
supervised on the true labels of the unlabeled pool, so the int8-vs-fp32 comparison is
made on a model that has learned something), exports it with ``zmdevice export --quantize
int8 --test``, then measures in the same process:

- CPU latency at batch 1: PyTorch eager vs onnxruntime fp32 (and int8), same threads,
  same input; target onnxruntime fp32 <= 0.5x PyTorch.
- int8 file size vs fp32; target <= 0.3x.
- int8 vs fp32 accuracy on the test split; target within 1 point.
- ``zmdevice predict`` cold start: a fresh process, start to first prediction, minus the
  bare interpreter start (``python -c pass``); aim < 1 s.

    python benchmarks/bench_export.py                 # both students, ~5-8 min on 2 cores
    python benchmarks/bench_export.py --students mobilenet_v3_small --image-steps 100

It also records the sizes of the saved student (``student.safetensors``, the checkpoint
export reads) and of its folder, and the process's peak RSS.

Writes benchmarks/work/bench_export.json (or ``--json PATH``) next to the printed table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "examples" / "default"

TARGETS = {
    "fp32_over_torch": ("<=", 0.5),
    "int8_over_fp32_size": ("<=", 0.3),
    "int8_minus_fp32_points": ("within", 1.0),
    "beyond_interpreter_s": ("<", 1.0),
}
"""Issue targets per result key: (comparison, threshold)."""


def target_text(key: str, unit: str = "") -> str:
    comparison, threshold = TARGETS[key]
    return f"{comparison} {threshold:g}{unit}"


def train_student(name: str, work: Path, steps: int, threads: int, seed: int = 0) -> Path:
    """Train ``name`` supervised on the gold labels of the default unlabeled pool; save it."""
    import torch

    # More threads than free cores makes torch's thread pool spin: 0.13 s/step on one
    # thread became 6 s/step on two while other jobs shared the two cores.
    torch.set_num_threads(threads)

    from zmdevice.augment import image_transforms
    from zmdevice.classes import load_classes
    from zmdevice.data import open_dataset
    from zmdevice.students import build_student, save_student

    modality = "image" if name.startswith("mobilenet") else "text"
    folder = DEFAULT_DATA / ("images" if modality == "image" else "text")
    classes = load_classes(str(folder / "classes.toml")).names
    gold = open_dataset(folder / "unlabeled_gold.csv", modality=modality, require_labels=True)
    targets = torch.tensor([classes.index(label) for label in gold.labels])
    torch.manual_seed(seed)
    student = build_student(name, classes, seed=seed)
    if modality == "image":
        pre = student.config["preprocess"]
        views = image_transforms(pre["image_size"], pre["mean"], pre["std"])
        # Cached clean tensors + random flips: enough to learn, cheap on a CPU.
        inputs = torch.stack([views["clean"](gold.load_image(i)) for i in range(len(gold))])
        batch_size, lr = 64, 2e-3
    else:
        ids, mask = student.encode_texts(gold.texts)
        student.freeze_word_embeddings()
        batch_size, lr = 16, 1e-4
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    started = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(len(gold), (batch_size,), generator=generator)
        if modality == "image":
            x = inputs[pick]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = student(pixel_values=x)
        else:
            length = int(mask[pick].sum(1).max())
            logits = student(input_ids=ids[pick, :length], attention_mask=mask[pick, :length])
        loss = torch.nn.functional.cross_entropy(logits, targets[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"  trained {name} for {steps} steps in {time.perf_counter() - started:.0f} s")
    out = save_student(student.eval(), work / "models" / name)
    # export reads the calibration data from here, as from a `zmdevice train` run
    unlabeled = folder / ("unlabeled" if modality == "image" else "unlabeled.csv")
    (out / "train_config.toml").write_text(f"unlabeled = {json.dumps(str(unlabeled))}\n")
    return out


def median_ms(run, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def latency(model_dir: Path, onnx_path: Path, int8_path: Path, threads: int, repeats: int):
    """Median batch-1 latency (ms): PyTorch eager, onnxruntime fp32, onnxruntime int8."""
    import onnxruntime as ort
    import torch

    from zmdevice.runtime import OnnxClassifier
    from zmdevice.students import load_student

    torch.set_num_threads(threads)
    student = load_student(model_dir)
    classifier = OnnxClassifier(onnx_path)
    if classifier.modality == "image":
        from PIL import Image

        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
        feed = classifier.encode_images([image])
    else:
        feed = classifier.encode_texts(["a small furry animal that lives in the woods"])
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}

    def eager():
        with torch.no_grad():
            student(**tensors)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    results = {"torch_ms": median_ms(eager, repeats)}
    for key, path in (("onnx_fp32_ms", onnx_path), ("onnx_int8_ms", int8_path)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results[key] = median_ms(lambda s=session: s.run(["logits"], feed), repeats)
    results["fp32_over_torch"] = results["onnx_fp32_ms"] / results["torch_ms"]
    results["sequence_length"] = int(feed["input_ids"].shape[1]) if "input_ids" in feed else None
    return results


def cold_start(onnx_path: Path, item: str, repeats: int = 5) -> dict:
    """Wall time of `zmdevice predict` in a fresh process, and of a bare interpreter."""
    zmdevice = shutil.which("zmdevice")
    command = [zmdevice] if zmdevice else [sys.executable, "-m", "zmdevice.cli"]

    def wall(args) -> float:
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        return time.perf_counter() - started

    bare = min(wall([sys.executable, "-c", "pass"]) for _ in range(repeats))
    predict = [wall([*command, "predict", str(onnx_path), item]) for _ in range(repeats)]
    return {
        "predict_s": statistics.median(predict),
        "interpreter_s": bare,
        "beyond_interpreter_s": statistics.median(predict) - bare,
    }


def bench(name: str, work: Path, steps: int, threads: int, repeats: int) -> dict:
    from zmdevice.config import ExportConfig
    from zmdevice.exporting.quantize import int8_path
    from zmdevice.exporting.run import run_export
    from zmdevice.students import WEIGHTS_FILE

    print(f"{name}:")
    model_dir = train_student(name, work, steps, threads)
    modality = "image" if name.startswith("mobilenet") else "text"
    folder = DEFAULT_DATA / ("images" if modality == "image" else "text")
    test = folder / ("test" if modality == "image" else "test.csv")
    onnx_path = work / "export" / f"{name}.onnx"
    started = time.perf_counter()
    summary = run_export(
        ExportConfig(model_dir=model_dir, out=onnx_path, quantize="int8", test=test)
    )
    export_s = time.perf_counter() - started
    for line in summary["lines"]:
        print("  " + line)
    quantized = int8_path(onnx_path)
    result = {
        "student": name,
        "train_steps": steps,
        "export_s": export_s,
        "exporter": summary["exporter"],
        "parity_relative_error": summary["parity"]["relative_error"],
        "fp32_bytes": onnx_path.stat().st_size,
        "int8_bytes": quantized.stat().st_size,
        "int8_over_fp32_size": quantized.stat().st_size / onnx_path.stat().st_size,
        "fp32_accuracy": summary["test"]["fp32_accuracy"],
        "int8_accuracy": summary["test"]["int8_accuracy"],
        "int8_minus_fp32_points": summary["test"]["int8_minus_fp32_points"],
        "checkpoint_bytes": (model_dir / WEIGHTS_FILE).stat().st_size,
        "model_dir_bytes": sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()),
        "tokenizer_bytes": Path(summary["tokenizer"]).stat().st_size
        if summary.get("tokenizer")
        else None,
        "threads": threads,
        **latency(model_dir, onnx_path, quantized, threads, repeats),
    }
    item = next((test).rglob("*.png")) if modality == "image" else "a large wild cat of Africa"
    result.update(cold_start(onnx_path, str(item)))
    return result


def print_table(results: list[dict]) -> None:
    # (label, result key, format, unit of the target where TARGETS has one)
    rows = [
        ("PyTorch eager, batch 1 (ms)", "torch_ms", "{:.2f}", ""),
        ("onnxruntime fp32, batch 1 (ms)", "onnx_fp32_ms", "{:.2f}", ""),
        ("onnxruntime int8, batch 1 (ms)", "onnx_int8_ms", "{:.2f}", ""),
        ("onnx fp32 / PyTorch latency", "fp32_over_torch", "{:.2f}x", "x"),
        ("fp32 file (MB)", "fp32_bytes", "{:.2f}", ""),
        ("int8 file (MB)", "int8_bytes", "{:.2f}", ""),
        ("int8 / fp32 file size", "int8_over_fp32_size", "{:.3f}x", "x"),
        ("fp32 test accuracy (%)", "fp32_accuracy", "{:.2f}", ""),
        ("int8 test accuracy (%)", "int8_accuracy", "{:.2f}", ""),
        ("int8 - fp32 (points)", "int8_minus_fp32_points", "{:+.2f}", ""),
        ("predict cold start (s)", "predict_s", "{:.2f}", ""),
        ("  beyond the interpreter (s)", "beyond_interpreter_s", "{:.2f}", " s"),
        ("student.safetensors (MB)", "checkpoint_bytes", "{:.2f}", ""),
    ]
    scale = {"fp32_bytes": 1e-6, "int8_bytes": 1e-6, "checkpoint_bytes": 1e-6}
    scale.update(fp32_accuracy=100, int8_accuracy=100)
    header = f"{'':34}" + "".join(f"{r['student']:>20}" for r in results) + "   target"
    print(header)
    for label, key, fmt, unit in rows:
        target = target_text(key, unit) if key in TARGETS else ""
        cells = "".join(f"{fmt.format(r[key] * scale.get(key, 1)):>20}" for r in results)
        print(f"{label:34}{cells}   {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", default="mobilenet_v3_small,distilbert")
    parser.add_argument("--image-steps", type=int, default=300)
    parser.add_argument("--text-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both runtimes")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per latency")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work")
    parser.add_argument("--json", type=Path, help="summary file (default WORK/bench_export.json)")
    args = parser.parse_args()
    results = []
    for name in args.students.split(","):
        steps = args.image_steps if name.startswith("mobilenet") else args.text_steps
        results.append(bench(name.strip(), args.work, steps, args.threads, args.repeats))
    print()
    print_table(results)
    # The whole process (every student); ru_maxrss is in KiB on Linux.
    peak_rss_gb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    print(f"peak RSS of this process: {peak_rss_gb:.2f} GB")
    for result in results:
        result["process_peak_rss_gb"] = peak_rss_gb
        result["targets"] = TARGETS
    out = args.json or args.work / "bench_export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
