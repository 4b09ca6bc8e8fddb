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
from zmdevice.config import check_device
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


@dataclass(frozen=True)
class DemoConfig:
    """`zmdevice demo`: which workflow to run and where."""

    out: Path = Path("demo-run")
    """Working folder for the demo's files."""
    modality: str = "text"
    """text or image."""
    quick: bool = False
    """A reduced run (fewer steps) for CI."""
    zero_shot: bool = False
    """Train on the FM's zero-shot labels (the paper's protocol) instead of the labels chosen
    with the labeled examples."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""

    def __post_init__(self):
        if self.modality not in PLANS:
            raise UserError(f"unknown --modality '{self.modality}': use text or image")
        check_device(self.device)
        object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class DemoRun:
    """One demo run's settings, plan and files, settled before the first step."""

    config: DemoConfig
    plan: DemoPlan
    data: Path
    """The plan's folder of the embedded default data."""
    started: float

    @property
    def labels(self) -> Path:
        return self.config.out / "labels" / f"{self.plan.data}.parquet"

    @property
    def model_dir(self) -> Path:
        return self.config.out / "models" / f"{self.plan.data}-zeromatch"

    @property
    def onnx(self) -> Path:
        return self.config.out / "export" / f"{self.plan.data}-zeromatch.onnx"

    def step(self, title: str) -> None:
        """Report progress on stderr, so that `--json` output on stdout stays parseable."""
        elapsed = time.perf_counter() - self.started
        print(f"[demo] {title} ({elapsed:.0f} s)", file=sys.stderr, flush=True)


def run_demo(config: DemoConfig) -> dict:
    """Run label -> train -> export -> predict on the embedded default; return the summary.

    The labels are made as ``zmdevice label --few-shot`` makes them from the labeled
    examples (the source cross-validation picks); ``zero_shot``: the FM's own labels.
    """
    run = begin(config)
    run.step(f"1/4 labeling {run.plan.unlabeled} with the foundation model '{run.plan.teacher}'")
    labeled = label_pool(run)
    fm_accuracy = teacher_accuracy(run)
    run.step(f"2/4 training {run.plan.student} with ZeroMatch (device {config.device})")
    trained = train_student(run)
    run.step("3/4 exporting to ONNX (fp32 and int8)")
    int8 = export_models(run)
    run.step("4/4 evaluating with PyTorch and with onnxruntime")
    results = {"fm_accuracy": fm_accuracy, **evaluate_models(run, int8)}
    return summarize(run, labeled, trained, results, int8)


def begin(config: DemoConfig) -> DemoRun:
    """The run's plan and data folder (UserError when the embedded data is missing)."""
    plan = PLANS[config.modality]
    data = default_data_dir() / plan.data
    if not data.is_dir():
        raise UserError(f"embedded default data not found at {data}; reinstall from the repo")
    return DemoRun(config, plan, data, time.perf_counter())


def label_pool(run: DemoRun) -> dict:
    """Label the unlabeled pool into ``run.labels``; the label summary."""
    from zmdevice.config import LabelConfig
    from zmdevice.labeling.run import run_label

    examples = run.data / run.plan.labeled
    # Zero-shot labels are measured on the labeled examples; labels made from those
    # examples would be measured on what they were made from, so they are not.
    made = {"gold": examples} if run.config.zero_shot else {"few_shot": examples}
    return run_label(
        LabelConfig(
            data=run.data / run.plan.unlabeled, classes=str(run.data / "classes.toml"),
            teacher=run.plan.teacher, out=run.labels, device=run.config.device, **made,
        )
    )  # fmt: skip


def teacher_accuracy(run: DemoRun) -> float:
    """The FM's zero-shot accuracy on the test split: the baseline the student must beat."""
    from zmdevice.config import LabelConfig
    from zmdevice.labeling.run import run_label

    test = run.data / run.plan.test
    summary = run_label(
        LabelConfig(
            data=test, classes=str(run.data / "classes.toml"), teacher=run.plan.teacher,
            out=run.config.out / "labels" / f"{run.plan.data}-test.parquet",
            device=run.config.device, gold=test,
        )
    )  # fmt: skip
    return summary["quality"]["accuracy"]


def train_student(run: DemoRun) -> dict:
    """Train the plan's student with ZeroMatch into ``run.model_dir``; the train summary."""
    from zmdevice.config import TrainConfig
    from zmdevice.training.run import run_train

    choice = 1 if run.config.quick else 0
    plan, data = run.plan, run.data
    return run_train(
        TrainConfig(
            labeled=data / plan.labeled, unlabeled=data / plan.unlabeled,
            pseudo_labels=run.labels, student=plan.student, out=run.model_dir,
            device=run.config.device, method="zeromatch", kd_steps=plan.kd_steps[choice],
            ssl_steps=plan.ssl_steps[choice], seed=0, test=data / plan.test,
            overwrite=True,  # a rerun of the demo replaces its own earlier model
        )
    )  # fmt: skip


def export_models(run: DemoRun) -> Path | None:
    """Export to ``run.onnx`` and its int8 copy; the int8 file's path (None: not written)."""
    from zmdevice.config import ExportConfig
    from zmdevice.exporting.run import run_export

    test = run.data / run.plan.test
    config = ExportConfig(model_dir=run.model_dir, out=run.onnx, quantize="int8", test=test)
    exported = run_export(config)
    return Path(exported["int8"]["path"]) if exported.get("int8") else None


def evaluate_models(run: DemoRun, int8: Path | None) -> dict:
    """Test accuracy of the student in PyTorch and in ONNX (fp32, int8), one prediction
    and the ONNX latencies."""
    from zmdevice.data import open_dataset
    from zmdevice.evaluate import run_evaluate_student
    from zmdevice.runtime import run_evaluate_onnx, run_predict

    test = run.data / run.plan.test
    columns = {"text_column": "text", "label_column": "label"}
    test_set = open_dataset(test)
    text = run.config.modality == "text"
    example = test_set.texts[0] if text else test_set.load_image(0)
    example_input = test_set.texts[0] if text else str(test_set.paths[0])
    return {
        "test_set": test_set,
        "torch": run_evaluate_student(run.model_dir, test, device=run.config.device, **columns),
        "onnx": run_evaluate_onnx(run.onnx, test, device="cpu", **columns),
        "int8": run_evaluate_onnx(int8, test, device="cpu", **columns) if int8 else None,
        "prediction": run_predict(run.onnx, [example_input], top_k=1, text_column="text"),
        "latency": onnx_latency_ms(run.onnx, example),
        "latency_int8": onnx_latency_ms(int8, example) if int8 else None,
    }


def size_mb(path: Path | None) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB" if path and path.is_file() else "-"


def result_table(run: DemoRun, results: dict, int8: Path | None) -> list[str]:
    """The comparison table: FM, student in PyTorch, in ONNX fp32 (and int8)."""

    def accuracy(summary: dict) -> str:
        return f"{100 * summary['accuracy']:.1f}%"

    rows = [
        ("FM zero-shot", run.plan.teacher, f"{100 * results['fm_accuracy']:.1f}%", "", ""),
        ("student, PyTorch", run.plan.student, accuracy(results["torch"]),
         size_mb(run.model_dir / "student.safetensors"), ""),
        ("student, ONNX fp32", run.onnx.name, accuracy(results["onnx"]), size_mb(run.onnx),
         f"{results['latency']:.1f} ms"),
    ]  # fmt: skip
    if results["int8"] is not None:
        rows.append(("student, ONNX int8", int8.name, accuracy(results["int8"]), size_mb(int8),
                     f"{results['latency_int8']:.1f} ms"))  # fmt: skip
    headers = ("model", "what", "test accuracy", "size", "latency (batch 1)")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
            for row in [headers, *rows]]  # fmt: skip


def summarize(run: DemoRun, labeled: dict, trained: dict, results: dict, int8) -> dict:
    """The demo's summary: its one-screen ``lines`` and the numbers ``--json`` gives."""
    config, test_set = run.config, results["test_set"]
    seconds = time.perf_counter() - run.started
    first = results["prediction"]["predictions"][0]
    shown = first["input"] if len(first["input"]) <= 60 else first["input"][:57] + "..."
    source = [line.strip() for line in labeled["lines"] if line.strip().startswith("labels:")]
    lines = [
        f"zmdevice demo ({config.modality}, {'quick' if config.quick else 'full'}): "
        f"{len(test_set)} test samples, {seconds:.0f} s in all",
        *result_table(run, results, int8),
        f"  zmdevice predict {run.onnx.name} '{shown}' -> {first['top'][0]['class']} "
        f"({first['top'][0]['probability']:.2f}); true class: {test_set.labels[0]}",
        *[f"  {line}" for line in source],
        f"  files under {config.out}: labels/, models/, export/",
    ]
    return {
        "modality": config.modality,
        "quick": config.quick,
        "label_source": labeled.get("label_source"),
        "fm_accuracy": results["fm_accuracy"],
        "student_accuracy_torch": results["torch"]["accuracy"],
        "student_accuracy_onnx": results["onnx"]["accuracy"],
        "student_accuracy_int8": results["int8"]["accuracy"] if results["int8"] else None,
        "onnx_bytes": run.onnx.stat().st_size,
        "int8_bytes": int8.stat().st_size if int8 else None,
        "latency_ms": results["latency"],
        "latency_int8_ms": results["latency_int8"],
        "train_seconds": trained.get("seconds"),
        "seconds": round(seconds, 1),
        "lines": lines,
    }
