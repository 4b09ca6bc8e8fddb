"""`zmdevice export`: the files of an export, beside ``--out``, all or none.

``run_export`` is what the CLI and the API call: ``plan_export`` checks and reads everything
before anything is written, ``write_export`` writes the files into a hidden folder and moves
them under their names (``export_files``: the fp32 model of ``graph.export_student``, its
model card, the int8 variant of ``quantize``, the .ort files of ``ort_format``), then the
optional ``--test`` evaluation and ``--hub-folder`` copy follow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from zmdevice.config import RUNS, check_opset
from zmdevice.errors import UserError, check_writable, disk_errors
from zmdevice.exporting.graph import ExportResult, export_student
from zmdevice.exporting.hub import write_hub_folder
from zmdevice.exporting.ort_format import write_ort
from zmdevice.exporting.parity import PARITY_BATCH_SIZES
from zmdevice.exporting.quantize import int8_path, quantize_int8

CALIBRATION_IMAGES = 256


@dataclass(frozen=True)
class ExportPlan:
    """What ``plan_export`` resolved; the steps that write files only read it."""

    model_dir: Path
    out: Path
    """The fp32 ``.onnx`` file; every other file is named after it, beside it."""
    student: object
    """The loaded ``zmdevice.students.Student``."""
    examples: list | None
    """Parity inputs from the training data (PIL images or strings); None = synthetic."""
    examples_source: str | None
    """Where ``examples`` came from, or why synthetic inputs are used instead."""
    calibration: list | None
    """Calibration images for static int8 (image models with ``--quantize int8``)."""

    def final(self, path) -> Path:
        """Where a file written into the staging folder ends up: beside ``out``."""
        return self.out.parent / Path(path).name


def run_export(config) -> dict:
    """`zmdevice export`: ONNX file (+ int8 variant), parity-checked; returns the summary.

    Args:
        config: ``zmdevice.config.ExportConfig``.
    """
    plan = plan_export(config)
    summary, lines = write_export(config, plan)
    if config.test is not None:
        summary["test"], line = evaluate_export(config.test, plan.out, "int8" in summary)
        lines.append(line)
    if config.hub_folder is not None:
        summary["hub_folder"], line = fill_hub_folder(config.hub_folder, plan.out, summary)
        lines.append(line)
    summary["lines"] = lines
    return summary


# ------------------------------------------------------------------------------ plan


def plan_export(config) -> ExportPlan:
    """Everything that can be checked, checked before the (slow) export writes anything;
    the student loaded and the parity and calibration inputs read."""
    from zmdevice.students import load_student, read_student_config

    check_opset(config.opset)
    model_dir = Path(config.model_dir)
    read_student_config(model_dir)  # UserError when the folder is not a trained student
    out = Path(config.out) if config.out else RUNS / "export" / f"{model_dir.name}.onnx"
    check_writable(out, "--out", suffix=".onnx")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: the output file must end in .onnx")
    if config.hub_folder is not None:
        check_writable(config.hub_folder, "--hub-folder", folder=True)
    student = load_student(model_dir)
    if config.test is not None:
        _check_test_data(config.test, student)
    data = training_data(model_dir)
    calibration = calibration_images(config, model_dir, student.modality, data)
    examples, source = parity_examples(data, student.modality)
    return ExportPlan(model_dir, out, student, examples, source, calibration)


def training_data(model_dir: Path) -> Path | None:
    """The unlabeled training data named by the student's ``train_config.toml``, if present."""
    config_file = model_dir / "train_config.toml"
    if not config_file.is_file():
        return None
    try:
        values = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    for key in ("unlabeled", "labeled"):
        if values.get(key):
            path = Path(values[key])
            for candidate in (path, model_dir / path):
                if candidate.exists():
                    return candidate
    return None


def sample_examples(data: Path, modality: str, count: int, text_column: str = "text") -> list:
    """``count`` samples spread evenly over a data set (PIL images or strings)."""
    from zmdevice.config import DataOptions
    from zmdevice.data import open_dataset

    dataset = open_dataset(data, DataOptions(text_column=text_column), modality=modality)
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int))
    if modality == "image":
        return [dataset.load_image(int(i)) for i in picks]
    return [dataset.texts[int(i)] for i in picks]


def calibration_images(config, model_dir: Path, modality: str, data: Path | None) -> list | None:
    """The images static int8 is calibrated on (``--calibration``, else the training data);
    None unless an image model is quantised."""
    if config.quantize != "int8" or modality != "image":
        return None
    calibration_data = Path(config.calibration) if config.calibration else data
    if calibration_data is None:
        raise UserError(
            f"--quantize int8 needs calibration images: {model_dir}/train_config.toml names no "
            "training data that exists here; pass --calibration DIR (a folder of typical images)"
        )
    return sample_examples(calibration_data, "image", CALIBRATION_IMAGES)


def parity_examples(data: Path | None, modality: str) -> tuple[list | None, str | None]:
    """(training samples for the parity check, where they came from); (None, None) without
    training data, (None, why) when it cannot be read: parity then runs on synthetic inputs."""
    if data is None:
        return None, None
    try:
        examples = sample_examples(data, modality, max(PARITY_BATCH_SIZES))
    except UserError as error:
        # Parity still runs (on synthetic inputs); the summary says why.
        return None, f"synthetic inputs (training data unreadable: {error})"
    return examples, f"{len(examples)} training samples from {data}"


def _check_test_data(test: Path, student) -> None:
    """UserError now, not after the export, when ``--test`` data cannot be evaluated."""
    from zmdevice.config import DataOptions
    from zmdevice.data import label_indices, open_dataset

    dataset = open_dataset(test, DataOptions(), modality=student.modality, require_labels=True)
    label_indices(dataset, student.classes, owner="the model")


# ------------------------------------------------------------------------------ files


def write_export(config, plan: ExportPlan) -> tuple[dict, list[str]]:
    """``export_files`` into a hidden folder beside ``out``, then each file moved under its
    name: a full disk or a failed check leaves nothing half-done. (summary, lines)."""
    out = plan.out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.stem}.export-", dir=out.parent))
    try:
        with disk_errors(out):
            try:
                summary, lines = export_files(config, plan, stage / out.name)
                for path in sorted(stage.iterdir()):
                    if path.is_file() and not path.name.startswith("."):
                        os.replace(path, out.parent / path.name)
            except OSError as error:
                if error.filename is None or Path(error.filename).parent != stage:
                    raise
                # Name the file the user asked for, not its temporary twin.
                final = str(out.parent / Path(error.filename).name)
                raise OSError(error.errno, error.strerror, final) from error
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary, lines


def export_files(config, plan: ExportPlan, staged: Path) -> tuple[dict, list[str]]:
    """Write the export's files into ``staged``'s folder; (summary, lines) naming them as
    they will be called beside ``plan.out`` (``write_export`` moves them there)."""
    result = export_student(
        plan.student,
        staged,
        opset=config.opset,
        examples=plan.examples,
        examples_source=plan.examples_source,
    )
    tokenizer = plan.final(result.tokenizer_path) if result.tokenizer_path else None
    card = plan.final(write_model_card(plan.model_dir, staged, config))
    summary = fp32_summary(plan, result, tokenizer, card)
    lines = fp32_lines(plan, result, tokenizer, card)
    if config.quantize == "int8":
        summary["int8"], line = int8_variant(plan, staged, result.size_bytes)
        lines.append(line)
    if config.format == "ort":
        sources = [staged, *([int8_path(staged)] if "int8" in summary else [])]
        summary["ort"], line = ort_variant(plan, sources)
        lines.append(line)
    return summary, lines


def fp32_summary(plan: ExportPlan, result: ExportResult, tokenizer, card: Path) -> dict:
    """The summary's entries for the fp32 model, its tokenizer and its card."""
    return {
        "model_dir": str(plan.model_dir),
        "onnx": str(plan.out),
        "size_bytes": result.size_bytes,
        "exporter": "dynamo",  # kept for readers of earlier summaries (benchmarks)
        "opset": result.opset,
        "parity": asdict(result.parity),
        "metadata": result.metadata,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "model_card": str(card),
    }


def fp32_lines(plan: ExportPlan, result: ExportResult, tokenizer, card: Path) -> list[str]:
    """What the CLI prints about the fp32 model, its parity, tokenizer and card."""
    parity = result.parity
    lines = [
        f"exported {plan.model_dir} -> {plan.out} ({result.size_bytes / 1e6:.2f} MB, "
        f"opset {result.opset}, dynamo exporter)",
        f"parity onnxruntime vs PyTorch: max relative logit error {parity.relative_error:.1e} "
        f"(abs {parity.max_abs_error:.1e}, scale {parity.logit_scale:.2g}), top class agrees on "
        f"{100 * parity.argmax_agreement:.0f}% over batch/length cases {parity.cases}, "
        f"inputs: {parity.inputs}",
    ]
    if tokenizer:
        lines.append(f"tokenizer: {tokenizer} (keep it next to the .onnx file)")
    lines.append(f"model card: {card}")
    return lines


def model_card_path(onnx_path: Path) -> Path:
    """``NAME.onnx`` -> ``NAME.README.md``: the training folder's model card, as exported."""
    return onnx_path.with_name(f"{onnx_path.stem}.README.md")


def card_given(config) -> dict:
    """What the user stated for the model card (``--card-*``); None = not stated."""
    return {
        "license": config.card_license,
        "language": config.card_language,
        "datasets": config.card_dataset,
        "intended_use": config.card_intended_use,
    }


def write_model_card(model_dir: Path, staged: Path, config) -> Path:
    """The training folder's card beside the staged model, with ``--card-*`` applied."""
    from zmdevice.model_card import exported_model_card

    # The model card travels with the model: an app developer sees what it is for and
    # under which terms; what the user states (--card-*) is applied to it.
    path = model_card_path(staged)
    path.write_text(exported_model_card(model_dir, card_given(config)), encoding="utf-8")
    return path


def int8_variant(plan: ExportPlan, staged: Path, fp32_bytes: int) -> tuple[dict, str]:
    """``NAME.int8.onnx`` beside the staged model: (summary entry, line)."""
    quantized = quantize_int8(staged, int8_path(staged), plan.calibration)
    quantized["path"] = str(plan.final(quantized["path"]))
    ratio = quantized["size_bytes"] / fp32_bytes
    line = (
        f"int8: {quantized['path']} ({quantized['size_bytes'] / 1e6:.2f} MB, "
        f"{ratio:.2f}x fp32), {quantized['method']}"
    )
    return {**quantized, "size_ratio": ratio}, line


def ort_variant(plan: ExportPlan, sources: list[Path]) -> tuple[dict, str]:
    """The .ort twins of the staged models and their operator list: (summary entry, line)."""
    written = write_ort(sources, plan.examples)
    written["files"] = [str(plan.final(path)) for path in written["files"]]
    written["operators_config"] = str(plan.final(written["operators_config"]))
    errors = ", ".join(f"{k} {v:.1e}" for k, v in written["relative_errors"].items())
    line = (
        f"ORT format: {', '.join(written['files'])} (max relative logit error vs .onnx: "
        f"{errors}); operators for a minimal build: {written['operators_config']}"
    )
    return written, line


# ------------------------------------------------------------------------------ after


def evaluate_export(test, out: Path, with_int8: bool) -> tuple[dict, str]:
    """``--test``: accuracy of the written fp32 (and int8) files: (summary entry, line)."""
    from zmdevice.runtime import run_evaluate_onnx

    fp32 = run_evaluate_onnx(out, test, device="cpu")
    entry = {"data": str(test), "fp32_accuracy": fp32["accuracy"]}
    line = f"test {test}: fp32 accuracy {100 * fp32['accuracy']:.2f}%"
    if with_int8:
        int8 = run_evaluate_onnx(int8_path(out), test, device="cpu")
        delta = 100 * (int8["accuracy"] - fp32["accuracy"])
        entry.update(int8_accuracy=int8["accuracy"], int8_minus_fp32_points=delta)
        line += f", int8 {100 * int8['accuracy']:.2f}% ({delta:+.2f} points)"
    return entry, line


def fill_hub_folder(folder, out: Path, summary: dict) -> tuple[dict, str]:
    """``--hub-folder``: the written files in the Hub's layout: (summary entry, line).
    ``folder`` and ``test`` above are named as the user gave them."""
    card = model_card_path(out).read_text(encoding="utf-8")
    with disk_errors(Path(folder), "--hub-folder"):
        written = write_hub_folder(Path(folder), summary, card)
    entry = {"folder": str(folder), "files": [str(p) for p in written]}
    line = (
        f"Hub folder: {folder} ({', '.join(p.name for p in written)}); upload it "
        "with huggingface_hub.upload_folder(folder_path=..., repo_id=...)"
    )
    return entry, line
