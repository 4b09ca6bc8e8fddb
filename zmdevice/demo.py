"""`zmdevice demo`: the whole workflow on the embedded default data, in a few CPU minutes.

label (a real offline foundation model) -> train (stage 1 KD, stage 2 SSL + aux KD) ->
export (ONNX, + int8) -> predict/evaluate with onnxruntime, then one small table: FM
zero-shot accuracy, student accuracy in PyTorch and in ONNX, model sizes and latency.
Every step goes through the same functions as the CLI commands, so the demo exercises
exactly what a user runs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from zmdevice.catalog import default_data_dir
from zmdevice.errors import UserError


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs for one modality (steps: full run, then the --quick run).

    The text budget is small on purpose: the MiniLM-initialised student passes the FM after
    a few dozen steps on the embedded data (15+15 steps: 77.8%, 120+120: 77.5%, FM 69.2%).
    """

    data: str
    """Folder under examples/default/."""
    teacher: str
    student: str
    unlabeled: str
    labeled: str
    test: str
    kd_steps: tuple[int, int]
    ssl_steps: tuple[int, int]


PLANS = {
    "text": DemoPlan(
        "text", "minilm", "distilbert", "unlabeled.csv", "labeled.csv", "test.csv",
        kd_steps=(60, 15), ssl_steps=(60, 15),
    ),
    "image": DemoPlan(
        "images", "efficientnet-lite0", "mobilenet_v3_small", "unlabeled", "labeled", "test",
        kd_steps=(300, 20), ssl_steps=(300, 20),
    ),
}  # fmt: skip


def onnx_latency_ms(model: Path, example, repeats: int = 30) -> float:
    """Median batch-1 latency of the ONNX model on one input, in milliseconds."""
    from zmdevice.runtime import OnnxClassifier

    classifier = OnnxClassifier(model, threads=1)
    classifier.predict_proba([example])  # warm-up: session and allocator set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.predict_proba([example])
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def run_demo(
    out: Path, modality: str = "text", quick: bool = False, device: str = "auto",
    zero_shot: bool = False,
) -> dict:  # fmt: skip
    """Run label -> train -> export -> predict on the embedded default; return the summary.

    The labels are made as ``zmdevice label --few-shot`` makes them from the labeled
    examples (the source cross-validation picks); ``zero_shot``: the FM's own labels.
    """
    from zmdevice.config import ExportConfig, LabelConfig, TrainConfig
    from zmdevice.data import open_dataset

    if modality not in PLANS:
        raise UserError(f"unknown --modality '{modality}': use text or image")
    plan = PLANS[modality]
    data = default_data_dir() / plan.data
    if not data.is_dir():
        raise UserError(f"embedded default data not found at {data}; reinstall from the repo")
    out = Path(out)
    classes = str(data / "classes.toml")
    started = time.perf_counter()
    lines: list[str] = []

    def step(title: str) -> None:
        # Progress goes to stderr so that `--json` output on stdout stays parseable.
        elapsed = time.perf_counter() - started
        print(f"[demo] {title} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    from zmdevice.labeling.run import run_label

    step(f"1/4 labeling {plan.unlabeled} with the foundation model '{plan.teacher}'")
    labels = out / "labels" / f"{plan.data}.parquet"
    # Zero-shot labels are measured on the labeled examples; labels made from those
    # examples would be measured on what they were made from, so they are not.
    made = {"gold": data / plan.labeled} if zero_shot else {"few_shot": data / plan.labeled}
    labeled_now = run_label(
        LabelConfig(
            data=data / plan.unlabeled, classes=classes, teacher=plan.teacher, out=labels,
            device=device, **made,
        )
    )  # fmt: skip
    source = [line.strip() for line in labeled_now["lines"] if line.strip().startswith("labels:")]
    # The FM's zero-shot accuracy on the test split: the baseline the student must beat.
    fm_test = run_label(
        LabelConfig(
            data=data / plan.test, classes=classes, teacher=plan.teacher,
            out=out / "labels" / f"{plan.data}-test.parquet", device=device,
            gold=data / plan.test,
        )
    )  # fmt: skip
    fm_accuracy = fm_test["quality"]["accuracy"]

    from zmdevice.training.run import run_train

    choice = 1 if quick else 0
    step(f"2/4 training {plan.student} with ZeroMatch (device {device})")
    model_dir = out / "models" / f"{plan.data}-zeromatch"
    trained = run_train(
        TrainConfig(
            labeled=data / plan.labeled, unlabeled=data / plan.unlabeled,
            pseudo_labels=labels, student=plan.student, out=model_dir, device=device,
            method="zeromatch", kd_steps=plan.kd_steps[choice],
            ssl_steps=plan.ssl_steps[choice], seed=0, test=data / plan.test,
            overwrite=True,  # a rerun of the demo replaces its own earlier model
        )
    )  # fmt: skip

    from zmdevice.evaluate import run_evaluate_student
    from zmdevice.exporting.run import run_export

    step("3/4 exporting to ONNX (fp32 and int8)")
    onnx_path = out / "export" / f"{plan.data}-zeromatch.onnx"
    exported = run_export(
        ExportConfig(model_dir=model_dir, out=onnx_path, quantize="int8", test=data / plan.test)
    )

    from zmdevice.runtime import run_evaluate_onnx, run_predict

    step("4/4 evaluating with PyTorch and with onnxruntime")
    torch_eval = run_evaluate_student(
        model_dir, data / plan.test, device=device, text_column="text", label_column="label"
    )
    onnx_eval = run_evaluate_onnx(
        onnx_path, data / plan.test, device="cpu", text_column="text", label_column="label"
    )
    int8_path = Path(exported["int8"]["path"]) if exported.get("int8") else None
    int8_eval = (
        run_evaluate_onnx(
            int8_path, data / plan.test, device="cpu", text_column="text", label_column="label"
        )
        if int8_path
        else None
    )
    test_set = open_dataset(data / plan.test)
    example = test_set.texts[0] if modality == "text" else test_set.load_image(0)
    example_input = test_set.texts[0] if modality == "text" else str(test_set.paths[0])
    prediction = run_predict(onnx_path, [example_input], top_k=1, text_column="text")
    latency = onnx_latency_ms(onnx_path, example)
    latency_int8 = onnx_latency_ms(int8_path, example) if int8_path else None

    def size_mb(path: Path | None) -> str:
        return f"{path.stat().st_size / 1e6:.1f} MB" if path and path.is_file() else "-"

    rows = [
        ("FM zero-shot", plan.teacher, f"{100 * fm_accuracy:.1f}%", "", ""),
        (
            "student, PyTorch",
            plan.student,
            f"{100 * torch_eval['accuracy']:.1f}%",
            size_mb(model_dir / "student.safetensors"),
            "",
        ),
        (
            "student, ONNX fp32",
            onnx_path.name,
            f"{100 * onnx_eval['accuracy']:.1f}%",
            size_mb(onnx_path),
            f"{latency:.1f} ms",
        ),
    ]
    if int8_eval is not None:
        rows.append(
            (
                "student, ONNX int8",
                int8_path.name,
                f"{100 * int8_eval['accuracy']:.1f}%",
                size_mb(int8_path),
                f"{latency_int8:.1f} ms",
            )
        )
    headers = ("model", "what", "test accuracy", "size", "latency (batch 1)")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines.append(
        f"zmdevice demo ({modality}, {'quick' if quick else 'full'}): "
        f"{len(test_set)} test samples, {time.perf_counter() - started:.0f} s in all"
    )
    for row in [headers, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    first = prediction["predictions"][0]
    shown = first["input"] if len(first["input"]) <= 60 else first["input"][:57] + "..."
    lines.append(
        f"  zmdevice predict {onnx_path.name} '{shown}' -> {first['top'][0]['class']} "
        f"({first['top'][0]['probability']:.2f}); true class: {test_set.labels[0]}"
    )
    lines += [f"  {line}" for line in source]
    lines.append(f"  files under {out}: labels/, models/, export/")
    return {
        "modality": modality,
        "quick": quick,
        "label_source": labeled_now.get("label_source"),
        "fm_accuracy": fm_accuracy,
        "student_accuracy_torch": torch_eval["accuracy"],
        "student_accuracy_onnx": onnx_eval["accuracy"],
        "student_accuracy_int8": int8_eval["accuracy"] if int8_eval else None,
        "onnx_bytes": onnx_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size if int8_path else None,
        "latency_ms": latency,
        "latency_int8_ms": latency_int8,
        "train_seconds": trained.get("seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "lines": lines,
    }
