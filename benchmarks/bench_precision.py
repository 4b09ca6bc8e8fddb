"""Precision and runtime benchmark: what each ``--precision`` / ``--runtime`` costs and gives.

(a) Teachers (the FM pass): the same collated batches through PyTorch fp32 eager (the
    baseline), PyTorch bf16 autocast and onnxruntime (the teacher exported to ONNX), the
    variants ALTERNATING batch by batch in one process so that a shared machine's load
    falls on all of them alike. Per variant: items/s (median over batches of the per-batch
    rate), its ratio to fp32 eager, and its agreement with fp32 eager: the share of samples
    with the same argmax label, the largest probability difference, and the share of
    probabilities that round to the same float16 (what the pseudo-label file stores).
(b) Students: one bare training step (forward + backward + AdamW) at the default stage-2
    batch, per precision, alternating in the same way; median seconds and the ratio to fp32.

The default (``auto``) of this machine for each model is printed next to the variants, from
``zmdevice.precision``: the numbers here are the measurements that choice rests on.

Usage::

    python benchmarks/bench_precision.py                       # minilm on default texts
    python benchmarks/bench_precision.py --texts data/text/unlabeled.csv --count 3000
    python benchmarks/bench_precision.py --count-images 500  # + efficientnet-lite0
    python benchmarks/bench_precision.py --students mobilenet_v3_small distilbert --steps 8
    python benchmarks/bench_precision.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "default" / "text"
IMAGES = ROOT / "examples" / "default" / "images"
TEACHER_VARIANTS = (("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("onnx-int8", "fp32"))
"""(runtime, precision); the first is the baseline."""
AGREEMENT_TARGET = 0.995
"""Share of samples whose label must match fp32 eager for a variant to be a default."""
STUDENT_BATCHES = {
    # The stage-2 composition of zmdevice.train's defaults: labeled weak + unlabeled weak +
    # unlabeled strong.
    "image": 16 + 64 + 64,
    "text": 16 + 16 + 16,
}


def synthetic_batch(student) -> dict:
    """One default stage-2-sized batch of random inputs for ``student`` (on the CPU)."""
    import torch

    batch = STUDENT_BATCHES[student.modality]
    generator = torch.Generator().manual_seed(0)
    if student.modality == "image":
        size = int(student.config["preprocess"]["image_size"])
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    length = int(student.config["preprocess"]["max_length"])
    vocabulary = student.tokenizer.get_vocab_size()
    ids = torch.randint(vocabulary // 10, vocabulary, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def variant_name(runtime: str, precision: str) -> str:
    return f"{runtime} {precision}" if runtime == "torch" else runtime.replace("-", " ")


def alternate(functions: dict, rounds: int) -> dict[str, list]:
    """Call every function once per round, rotating the order each round; return the
    per-round results (each function returns (seconds, anything))."""
    names = list(functions)
    results: dict[str, list] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(functions[name](round_index))
    return results


def teacher_rows(
    teacher_name: str, data: Path, classes: str, count: int, batch_size: int, variants=None
):
    """Speed and agreement of each teacher variant (default: all of ``TEACHER_VARIANTS``;
    the first is the baseline) on the first ``count`` samples."""
    import torch

    from zmdevice.classes import load_classes
    from zmdevice.data import open_dataset
    from zmdevice.precision import Hardware, choose_runtime, model_family, teacher_precision
    from zmdevice.teachers import build_teacher, resolve_spec, teacher_class

    dataset = open_dataset(data)
    class_list = load_classes(classes)
    teachers = {}
    variants = variants or TEACHER_VARIANTS
    for runtime, precision in variants:
        teacher = build_teacher(
            teacher_name, class_list, device="cpu", precision=precision, runtime=runtime
        )
        teachers[variant_name(runtime, precision)] = teacher
    any_teacher = next(iter(teachers.values()))
    hardware, family = Hardware.probe("cpu"), model_family(any_teacher.model)
    runtime = choose_runtime("auto", hardware, teacher_class(resolve_spec(teacher_name)[0]), "auto")
    default = teacher_precision("auto", runtime, hardware, family)
    default_name = variant_name(runtime, default.name)
    count = min(count, len(dataset))
    raw = [
        dataset.load_image(i) if dataset.modality == "image" else dataset.texts[i]
        for i in range(count)
    ]
    batches = [
        any_teacher.collate([any_teacher.prepare(x) for x in raw[s : s + batch_size]])
        for s in range(0, count, batch_size)
    ]
    for teacher in teachers.values():
        teacher.predict_proba(batches[0])  # warm-up (allocator, onnxruntime's first run)

    def timed(teacher):
        def run(round_index):
            batch = batches[round_index]
            started = time.perf_counter()
            probs = teacher.predict_proba(batch)
            return time.perf_counter() - started, probs

        return run

    results = alternate({name: timed(t) for name, t in teachers.items()}, len(batches))
    sizes = [len(b["input_ids"] if hasattr(b, "keys") else b) for b in batches]
    baseline_name = variant_name(*variants[0])
    reference = torch.cat([probs for _, probs in results[baseline_name]]).numpy()
    rates = {
        name: statistics.median(n / seconds for n, (seconds, _) in zip(sizes, runs, strict=True))
        for name, runs in results.items()
    }
    rows = []
    for name, runs in results.items():
        probs = torch.cat([p for _, p in runs]).numpy()
        same_fp16 = probs.astype(np.float16) == reference.astype(np.float16)
        rows.append(
            {
                "teacher": teacher_name,
                "variant": name,
                "default": name == default_name,
                "default_reason": default.reason if name == default_name else None,
                "items": count,
                "batch_size": batch_size,
                "items_per_s": rates[name],
                "ratio_to_fp32_eager": rates[name] / rates[baseline_name],
                "label_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_prob_diff": float(np.abs(probs - reference).max()),
                "same_fp16_share": float(same_fp16.mean()),
            }
        )
    return rows


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def student_rows(student_name: str, steps: int, precisions: list[str], device="cpu") -> list:
    """Median bare training step per precision (forward + backward + AdamW, with the
    gradient scaler fp16 needs), the precisions alternating step by step."""
    import torch

    from zmdevice.precision import Hardware, Precision, choose_precision, model_family
    from zmdevice.students import build_student

    device = torch.device(device)
    classes = [f"class_{i}" for i in range(10)]
    models, optimizers = {}, {}
    for name in precisions:
        student = build_student(student_name, classes, seed=0).to(device)
        student.use_channels_last()
        models[name] = student
        optimizers[name] = torch.optim.AdamW(student.parameters(), lr=1e-4)
    any_student = next(iter(models.values()))
    batch = STUDENT_BATCHES[any_student.modality]
    inputs = {k: v.to(device) for k, v in synthetic_batch(any_student).items()}
    auto = choose_precision("auto", Hardware.probe(device), model_family(any_student))

    def timed(name):
        student, optimizer = models[name], optimizers[name]
        precision = Precision(name, device.type, "benchmark")
        scaler = precision.grad_scaler()

        def run(_):
            synchronize(device)
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = student(**inputs)
            scaler.scale(logits.float().logsumexp(dim=1).mean()).backward()
            scaler.step(optimizer)
            scaler.update()
            synchronize(device)
            return time.perf_counter() - started, None

        return run

    results = alternate({name: timed(name) for name in precisions}, steps + 1)
    medians = {name: statistics.median(s for s, _ in runs[1:]) for name, runs in results.items()}
    return [
        {
            "student": student_name,
            "device": str(device),
            "precision": name,
            "default": name == auto.name,
            "default_reason": auto.reason if name == auto.name else None,
            "batch": batch,
            "steps": steps,
            "step_s": medians[name],
            "speedup_vs_fp32": medians["fp32"] / medians[name],
        }
        for name in precisions
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=Path, default=TEXT / "unlabeled.csv")
    parser.add_argument("--text-classes", default=str(TEXT / "classes.toml"))
    parser.add_argument("--count", type=int, default=512, help="texts for minilm (0: none)")
    parser.add_argument("--images", type=Path, default=IMAGES / "unlabeled")
    parser.add_argument("--image-classes", default=str(IMAGES / "classes.toml"))
    parser.add_argument("--count-images", type=int, default=0, help="images (0: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--text-variants",
        nargs="*",
        default=[f"{runtime}:{precision}" for runtime, precision in TEACHER_VARIANTS],
        help="runtime:precision pairs for the text teacher (the first is the baseline)",
    )
    parser.add_argument(
        "--image-variants",
        nargs="*",
        default=["torch:fp32", "torch:bf16", "onnx:fp32"],
        help="runtime:precision pairs for the image teacher (bf16 is slow where emulated)",
    )
    parser.add_argument("--students", nargs="*", default=[], help="student presets to time")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    import torch

    from zmdevice.precision import cpu_bf16_flags

    flags = cpu_bf16_flags()
    print(
        f"CPU bf16 instructions: {', '.join(flags) or 'none'}; torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads"
    )
    teachers = []
    runs = []
    if args.count:
        runs.append(("minilm", args.texts, args.text_classes, args.count))
    if args.count_images:
        runs.append(("efficientnet-lite0", args.images, args.image_classes, args.count_images))
    for name, data, classes, count in runs:
        pairs = args.image_variants if name == "efficientnet-lite0" else args.text_variants
        variants = [tuple(pair.split(":")) for pair in pairs]
        rows = teacher_rows(name, data, classes, count, args.batch_size, variants)
        teachers += rows
        for row in rows:
            print(
                f"  {name:<20} {row['variant']:<11} {row['items_per_s']:7.1f} items/s "
                f"x{row['ratio_to_fp32_eager']:.2f} of fp32 eager; labels agree "
                f"{100 * row['label_agreement']:.2f}%, max |dp| {row['max_abs_prob_diff']:.1e}, "
                f"same fp16 {100 * row['same_fp16_share']:.1f}%"
                + ("  <- default" if row["default"] else "")
            )
    students = []
    for name in args.students:
        rows = student_rows(name, args.steps, ["fp32", "bf16"])
        students += rows
        for row in rows:
            print(
                f"  {name:<20} {row['precision']:<5} step {1000 * row['step_s']:7.0f} ms "
                f"(batch {row['batch']}) x{row['speedup_vs_fp32']:.2f} vs fp32"
                + ("  <- default" if row["default"] else "")
            )
    if args.json:
        result = {
            "cpu_bf16_flags": list(flags),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "agreement_target": AGREEMENT_TARGET,
            "teachers": teachers,
            "students": students,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
