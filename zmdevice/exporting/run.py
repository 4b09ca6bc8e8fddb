"""Export a trained student to one self-contained ONNX file, checked against PyTorch.

``export_student`` is the library function: main head only, output ``logits``, dynamic
batch (and sequence length for text), the zmdevice metadata in ``metadata_props``, and an
onnxruntime-vs-PyTorch parity check on real inputs before the file appears under its
name. ``run_export`` is what ``zmdevice export`` calls; it adds the int8 variant
(``exporting.quantize``) and ONNX Runtime's mobile format (``exporting.ort_format``).

The ONNX contract (input names, shapes, metadata keys) is documented for app developers
in ``export/README.md``; ``zmdevice.runtime`` is its reference reader. Over 500 lines on
purpose: the export, its parity inputs and check, and ``run_export`` share the student's
preprocessing and the metadata contract.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zmdevice import __version__
from zmdevice.config import ExportConfig, check_opset
from zmdevice.errors import UserError, atomic_path, atomic_paths, check_writable, disk_errors

FORMAT = "zmdevice-onnx"
FORMAT_VERSION = 1
PARITY_TOLERANCE = 1e-4
"""Max |onnxruntime - PyTorch| over all parity logits, relative to max |PyTorch logit|."""
PARITY_BATCH_SIZES = (1, 3, 8)
CALIBRATION_IMAGES = 256
SYNTHETIC_TEXTS = (
    "a dog",
    "bread",
    "a small red bird sat on the branch of a tree",
    "the river runs through the city past an old stone bridge",
    "something used as a tool to fix a car or a house, made of metal and wood",
    "a person who works with children at a school in the country",
    "water",
    "the fruit of a plant that grows in warm places and is eaten fresh or dried",
)


class ExportError(UserError):
    """The exported graph disagrees with PyTorch (or could not be produced at all)."""


@dataclass
class ParityReport:
    """How closely onnxruntime reproduces PyTorch's logits on the parity inputs."""

    max_abs_error: float
    """Largest |onnxruntime - PyTorch| logit difference over all cases."""
    logit_scale: float
    """Largest |PyTorch logit| over all cases (the scale errors are measured against)."""
    relative_error: float
    """max_abs_error / logit_scale."""
    argmax_agreement: float
    """Fraction of samples whose top class is the same in both."""
    cases: list[list[int]]
    """[batch size, sequence length (0 for images)] of each compared case."""
    inputs: str
    """Where the inputs came from ('training data ...' or 'synthetic ...')."""


@dataclass
class ExportResult:
    """What ``export_student`` wrote."""

    path: Path
    opset: int
    size_bytes: int
    parity: ParityReport
    metadata: dict[str, str]
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ metadata


def onnx_metadata(student, opset: int, tokenizer_name: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported student (all values are strings).

    Keys: ``zmdevice.format``, ``zmdevice.format_version``, ``zmdevice.classes`` (JSON list),
    ``zmdevice.modality``, ``zmdevice.preprocess`` (JSON), ``zmdevice.student``,
    ``zmdevice.version``, ``zmdevice.opset``.
    """
    config = student.config
    source = config["preprocess"]
    if student.modality == "image":
        preprocess = {
            "image_size": int(source["image_size"]),
            "mean": [float(x) for x in source["mean"]],
            "std": [float(x) for x in source["std"]],
            "channel_order": source.get("channel_order", "RGB"),
            "resize": source.get("resize", "bilinear"),
            "layout": "NCHW",
            "scale": "1/255",
        }
    else:
        preprocess = {
            "max_length": int(source["max_length"]),
            "tokenizer": tokenizer_name or source.get("tokenizer", "tokenizer.json"),
            "pad_token_id": int(source["pad_token_id"]),
            "lowercase": bool(source.get("lowercase", True)),
            "padding": "right",
            "truncation": "right",
        }
    return {
        "zmdevice.format": FORMAT,
        "zmdevice.format_version": str(FORMAT_VERSION),
        "zmdevice.classes": json.dumps(list(config["classes"])),
        "zmdevice.modality": student.modality,
        "zmdevice.preprocess": json.dumps(preprocess),
        "zmdevice.student": str(config.get("student", "")),
        "zmdevice.version": __version__,
        "zmdevice.opset": str(opset),
    }


def write_metadata(model_proto, metadata: dict[str, str]) -> None:
    """Replace the ``zmdevice.*`` entries of ``model_proto.metadata_props`` in place."""
    kept = [p for p in model_proto.metadata_props if not p.key.startswith("zmdevice.")]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def strip_debug_info(model_proto) -> None:
    """Drop the exporter's per-node debug annotations (FX node text, Python class paths,
    stack traces) in place: they can triple a small model's file and name local paths.
    """
    graphs = [model_proto.graph] + [f for f in model_proto.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""


def save_model(model_proto, target: Path) -> int:
    """Check and save an in-memory ONNX model as one file, atomically; returns its size."""
    onnx_checked(model_proto)
    with atomic_path(target) as tmp:
        write_model(model_proto, tmp)
    return target.stat().st_size


def onnx_checked(model_proto) -> None:
    import onnx

    onnx.checker.check_model(model_proto)


def write_model(model_proto, path: Path) -> None:
    """The ONNX model as one file at ``path`` (no external data)."""
    import onnx

    onnx.save_model(model_proto, str(path), save_as_external_data=False)
    _readable(path)


def _readable(path: Path) -> None:
    """Give a finished file the usual umask permissions (temp files start as 0600).

    Exported models are served to browsers and read by other users' apps.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ------------------------------------------------------------------------------ graph


def _head_module(student):
    """A module whose positional forward arguments are the ONNX inputs, in order."""
    import torch

    class ImageHead(torch.nn.Module):
        def __init__(self, student):
            super().__init__()
            self.student = student

        def forward(self, pixel_values):
            return self.student(pixel_values=pixel_values)

    class TextHead(torch.nn.Module):
        def __init__(self, student):
            super().__init__()
            self.student = student

        def forward(self, input_ids, attention_mask):
            return self.student(input_ids=input_ids, attention_mask=attention_mask)

    return (ImageHead if student.modality == "image" else TextHead)(student).eval()


def _input_names(modality: str) -> list[str]:
    return ["pixel_values"] if modality == "image" else ["input_ids", "attention_mask"]


def _trace_graph(student, example: dict[str, np.ndarray], opset: int):
    """The ONNX ModelProto of the main head, written by torch's dynamo exporter.

    Raises:
        ExportError: the exporter fails (the student names itself, the reason follows).
    """
    import torch

    module = _head_module(student)
    names = _input_names(student.modality)
    args = tuple(torch.from_numpy(example[name]) for name in names)
    batch = torch.export.Dim("batch", min=1, max=65536)
    if student.modality == "image":
        dynamic_shapes = {"pixel_values": {0: batch}}
    else:
        max_length = int(student.config["preprocess"]["max_length"])
        sequence = torch.export.Dim("sequence", min=1, max=max(max_length, 2))
        dynamic_shapes = {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: sequence},
        }
    quiet = io.StringIO()
    try:
        # The dynamo exporter narrates its passes on stdout; keep the CLI summary clean.
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                external_data=False,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    except ModuleNotFoundError:
        raise  # onnx / onnxscript missing: the CLI names the extra that installs them
    except Exception as error:  # any other exporter failure: one line naming the student
        raise ExportError(
            f"cannot export student '{student.config.get('student')}' to ONNX: "
            f"{' '.join(str(error).split())[:200]}"
        ) from error
    return program.model_proto


# ------------------------------------------------------------------------------ inputs


def synthetic_images(image_size: int, count: int = 8, seed: int = 0) -> list:
    """Random RGB PIL images of assorted sizes (so the resize path runs too)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [image_size, image_size * 2, max(image_size // 2, 4), image_size + 5]
    images = []
    for i in range(count):
        side = sizes[i % len(sizes)]
        # Smooth blobs rather than white noise: closer to real photos after resizing.
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((side, side), Image.BILINEAR))
    return images


def parity_feeds(student, examples: list, tokenizer=None) -> list[dict[str, np.ndarray]]:
    """Model inputs for the parity check, preprocessed exactly as the runtime does.

    Images: batches of 1, 3 and 8 images (examples are cycled). Text: batch 1 truncated to
    max_length / 2 tokens, batch 3 truncated to 3/4 max_length and padded to its longest
    text, batch 8 padded to max_length: several sequence lengths, with padding, even when
    every example is longer than max_length.

    Args:
        student: the student (for its preprocessing settings).
        examples: PIL images or strings (at least one).
        tokenizer: for text, a ``tokenizers.Tokenizer`` set up by
            ``runtime.configure_tokenizer`` (its truncation is changed here).
    """
    from zmdevice.runtime import preprocess_image

    cycled = [examples[i % len(examples)] for i in range(max(PARITY_BATCH_SIZES))]
    if student.modality == "image":
        preprocess = student.config["preprocess"]
        pixels = np.stack([preprocess_image(image, preprocess) for image in cycled])
        return [{"pixel_values": pixels[:size]} for size in PARITY_BATCH_SIZES]
    max_length = int(student.config["preprocess"]["max_length"])
    pad_id = int(student.config["preprocess"]["pad_token_id"])
    limits = (max(2, max_length // 2), max(2, 3 * max_length // 4), max_length)
    feeds = []
    for size, limit in zip(PARITY_BATCH_SIZES, limits, strict=True):
        tokenizer.enable_truncation(max_length=limit)
        encodings = tokenizer.encode_batch(list(cycled[:size]))
        # The tokenizer pads to the batch's longest text; the last case pads to max_length.
        length = max_length if limit == max_length else len(encodings[0].ids)
        ids = np.full((size, length), pad_id, dtype=np.int64)
        mask = np.zeros((size, length), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            count = sum(encoding.attention_mask)
            ids[i, :count] = encoding.ids[:count]
            mask[i, :count] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    tokenizer.enable_truncation(max_length=max_length)
    return feeds


def check_parity(student, model_bytes: bytes, feeds: list[dict], inputs: str, tolerance: float):
    """Run onnxruntime and PyTorch on the same feeds; ExportError beyond ``tolerance``.

    The error is measured relative to the largest PyTorch logit: an untrained network's
    logits can be ~1e-11, where any absolute tolerance would pass anything.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    student = student.eval()
    max_abs, scale, agree, total, cases = 0.0, 0.0, 0, 0, []
    for feed in feeds:
        with torch.no_grad():
            expected = student(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
        got = session.run(["logits"], feed)[0]
        if got.shape != expected.shape:
            raise ExportError(f"ONNX logits have shape {got.shape}, PyTorch {expected.shape}")
        max_abs = max(max_abs, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(expected)
        first = next(iter(feed.values()))
        cases.append([int(first.shape[0]), int(first.shape[1]) if first.ndim == 2 else 0])
    relative = max_abs / max(scale, 1e-30)
    report = ParityReport(max_abs, scale, relative, agree / max(total, 1), cases, inputs)
    if not np.isfinite(relative) or relative > tolerance:
        raise ExportError(
            f"ONNX export disagrees with PyTorch: max relative logit error {relative:.2e} "
            f"(max abs {max_abs:.2e}, logit scale {scale:.2e}) exceeds {tolerance:.0e} "
            f"on {inputs}; report this with the student's config.json"
        )
    return report


# ------------------------------------------------------------------------------ export


def export_student(
    student,
    out_path: str | Path,
    *,
    opset: int = ExportConfig.opset,
    examples: list | None = None,
    examples_source: str | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportResult:
    """Export a student's main head to one ONNX file after checking it against PyTorch.

    Args:
        student: a ``zmdevice.students.Student``; it is moved to the CPU and left in eval
            mode (the export traces inference: BatchNorm statistics, no dropout).
        out_path: target ``.onnx`` file; a text model's tokenizer is written beside it as
            ``<stem>.tokenizer.json``.
        opset: ONNX opset version.
        examples: real inputs for the parity check (PIL images or strings); None uses
            synthetic ones.
        examples_source: where ``examples`` came from, for the report.
        tolerance: max logit error relative to the logit scale.

    Returns:
        ExportResult. Nothing is written unless the parity check passes.

    Raises:
        ExportError: export failed or onnxruntime disagrees with PyTorch beyond tolerance.
    """
    from zmdevice.runtime import configure_tokenizer

    check_opset(opset)
    out_path = Path(out_path)
    student = student.cpu().eval()
    tokenizer_name = f"{out_path.stem}.tokenizer.json" if student.modality == "text" else None
    metadata = onnx_metadata(student, opset, tokenizer_name)
    preprocess = json.loads(metadata["zmdevice.preprocess"])
    tokenizer = None
    if student.modality == "text":
        from tokenizers import Tokenizer

        # A private copy: configure_tokenizer changes padding/truncation settings.
        tokenizer = configure_tokenizer(Tokenizer.from_str(student.tokenizer.to_str()), preprocess)
    if not examples:
        if student.modality == "image":
            examples = synthetic_images(int(preprocess["image_size"]))
        else:
            examples = list(SYNTHETIC_TEXTS)
        examples_source = examples_source or "synthetic inputs"
    inputs = examples_source or f"{len(examples)} given inputs"
    feeds = parity_feeds(student, list(examples), tokenizer)
    # Trace with a batch > 1 (dynamo specialises a batch of 1) and, for text, padding.
    model_proto = _trace_graph(student, feeds[1], opset)
    strip_debug_info(model_proto)
    write_metadata(model_proto, metadata)
    model_bytes = model_proto.SerializeToString()
    parity = check_parity(student, model_bytes, feeds, inputs, tolerance)
    onnx_checked(model_proto)
    tokenizer_path = out_path.parent / tokenizer_name if tokenizer_name else None
    # The model and its tokenizer appear together or not at all (a full disk).
    with atomic_paths(out_path, *([tokenizer_path] if tokenizer_path else [])) as temporary:
        write_model(model_proto, temporary[0])
        if tokenizer_path:
            # The student's own file, untouched: the runtime applies the metadata settings.
            temporary[1].write_text(student.tokenizer.to_str(), encoding="utf-8")
    size = out_path.stat().st_size
    return ExportResult(out_path, opset, size, parity, metadata, tokenizer_path)


# ------------------------------------------------------------------------------ model card


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


def write_hub_folder(folder: Path, summary: dict, card: str) -> list[Path]:
    """The layout ``huggingface_hub.upload_folder`` takes, from an export's files.

    ``README.md`` (the card, whose front matter the Hub reads), the exported ONNX file(s)
    and the tokenizer under their exported names (the ONNX metadata names the tokenizer
    file, so ``zmdevice.load(folder / NAME.onnx)`` works there), and ``config.json``: the
    class names (``classes``, ``id2label``, ``label2id``), modality, preprocessing and file
    names. Each file is written atomically; other files in ``folder`` are left alone.

    Returns:
        The files written.
    """
    metadata = summary["metadata"]
    classes = json.loads(metadata["zmdevice.classes"])
    onnx = Path(summary["onnx"])
    files = [onnx]
    if summary.get("int8"):
        files.append(Path(summary["int8"]["path"]))
    if summary.get("tokenizer"):
        files.append(Path(summary["tokenizer"]))
    if summary.get("ort"):
        files += [Path(path) for path in summary["ort"]["files"]]
    config = {
        "library_name": "zmdevice",
        "format": metadata["zmdevice.format"],
        "format_version": int(metadata["zmdevice.format_version"]),
        "model_file": onnx.name,
        "int8_model_file": Path(summary["int8"]["path"]).name if summary.get("int8") else None,
        "tokenizer_file": Path(summary["tokenizer"]).name if summary.get("tokenizer") else None,
        "modality": metadata["zmdevice.modality"],
        "classes": classes,
        "id2label": {str(index): name for index, name in enumerate(classes)},
        "label2id": {name: index for index, name in enumerate(classes)},
        "preprocess": json.loads(metadata["zmdevice.preprocess"]),
        "student": metadata["zmdevice.student"],
        "zmdevice_version": metadata["zmdevice.version"],
    }
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for source in files:
        with atomic_path(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
        written.append(folder / source.name)
    for name, text in (("README.md", card), ("config.json", json.dumps(config, indent=2) + "\n")):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


# ------------------------------------------------------------------------------ CLI stage


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


def _check_test_data(test: Path, student) -> None:
    """UserError now, not after the export, when ``--test`` data cannot be evaluated."""
    from zmdevice.config import DataOptions
    from zmdevice.data import label_indices, open_dataset

    dataset = open_dataset(test, DataOptions(), modality=student.modality, require_labels=True)
    label_indices(dataset, student.classes, owner="the model")


def export_files(config, student, model_dir: Path, out: Path, staged: Path, samples: tuple):
    """Write the export's files into ``staged``'s folder; (summary, lines) naming them as
    they will be called beside ``out`` (``run_export`` moves them there).

    Args:
        samples: (parity examples or None, where they came from, calibration images or None).
    """
    from zmdevice.exporting.ort_format import write_ort
    from zmdevice.exporting.quantize import int8_path, quantize_int8

    examples, source, calibration = samples

    def final(path) -> Path:
        return out.parent / Path(path).name

    result = export_student(
        student, staged, opset=config.opset, examples=examples, examples_source=source
    )
    parity = result.parity
    lines = [
        f"exported {model_dir} -> {out} ({result.size_bytes / 1e6:.2f} MB, opset {config.opset}, "
        "dynamo exporter)",
        f"parity onnxruntime vs PyTorch: max relative logit error {parity.relative_error:.1e} "
        f"(abs {parity.max_abs_error:.1e}, scale {parity.logit_scale:.2g}), top class agrees on "
        f"{100 * parity.argmax_agreement:.0f}% over batch/length cases {parity.cases}, "
        f"inputs: {parity.inputs}",
    ]
    tokenizer = final(result.tokenizer_path) if result.tokenizer_path else None
    if tokenizer:
        lines.append(f"tokenizer: {tokenizer} (keep it next to the .onnx file)")
    from zmdevice.report import exported_model_card

    # The model card travels with the model: an app developer sees what it is for and
    # under which terms; what the user states (--card-*) is applied to it.
    model_card_path(staged).write_text(
        exported_model_card(model_dir, card_given(config)), encoding="utf-8"
    )
    card = final(model_card_path(staged))
    lines.append(f"model card: {card}")
    summary: dict = {
        "model_dir": str(model_dir),
        "onnx": str(out),
        "size_bytes": result.size_bytes,
        "exporter": "dynamo",  # kept for readers of earlier summaries (benchmarks)
        "opset": config.opset,
        "parity": asdict(parity),
        "metadata": result.metadata,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "model_card": str(card) if card else None,
    }
    if config.quantize == "int8":
        quantized = quantize_int8(staged, int8_path(staged), calibration)
        quantized["path"] = str(final(quantized["path"]))
        ratio = quantized["size_bytes"] / result.size_bytes
        lines.append(
            f"int8: {quantized['path']} ({quantized['size_bytes'] / 1e6:.2f} MB, "
            f"{ratio:.2f}x fp32), {quantized['method']}"
        )
        summary["int8"] = {**quantized, "size_ratio": ratio}
    if config.format == "ort":
        sources = [staged, *([int8_path(staged)] if "int8" in summary else [])]
        written = write_ort(sources, examples)
        written["files"] = [str(final(path)) for path in written["files"]]
        written["operators_config"] = str(final(written["operators_config"]))
        errors = ", ".join(f"{k} {v:.1e}" for k, v in written["relative_errors"].items())
        lines.append(
            f"ORT format: {', '.join(written['files'])} (max relative logit error vs .onnx: "
            f"{errors}); operators for a minimal build: {written['operators_config']}"
        )
        summary["ort"] = written
    return summary, lines


def run_export(config) -> dict:
    """`zmdevice export`: ONNX file (+ int8 variant), parity-checked; returns the summary.

    Args:
        config: ``zmdevice.config.ExportConfig``.
    """
    from zmdevice.exporting.quantize import int8_path
    from zmdevice.students import load_student, read_student_config

    # Everything that can be checked is checked before the (slow) export writes anything.
    check_opset(config.opset)
    model_dir = Path(config.model_dir)
    read_student_config(model_dir)  # UserError when the folder is not a trained student
    out = Path(config.out) if config.out else Path("export") / f"{model_dir.name}.onnx"
    check_writable(out, "--out", suffix=".onnx")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: the output file must end in .onnx")
    if config.hub_folder is not None:
        check_writable(config.hub_folder, "--hub-folder", folder=True)
    student = load_student(model_dir)
    if config.test is not None:
        _check_test_data(config.test, student)
    data = training_data(model_dir)
    calibration_data = Path(config.calibration) if config.calibration else data
    if config.quantize == "int8" and student.modality == "image" and calibration_data is None:
        raise UserError(
            f"--quantize int8 needs calibration images: {model_dir}/train_config.toml names no "
            "training data that exists here; pass --calibration DIR (a folder of typical images)"
        )
    calibration = None
    if config.quantize == "int8" and student.modality == "image":
        calibration = sample_examples(calibration_data, "image", CALIBRATION_IMAGES)
    examples, source = None, None
    if data is not None:
        try:
            examples = sample_examples(data, student.modality, max(PARITY_BATCH_SIZES))
            source = f"{len(examples)} training samples from {data}"
        except UserError as error:
            # Parity still runs (on synthetic inputs); the summary says why.
            source = f"synthetic inputs (training data unreadable: {error})"
    # Every file is written into a hidden folder beside --out and moved under its name only
    # once all of them were written: a full disk or a failed check leaves nothing half-done.
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.stem}.export-", dir=out.parent))
    try:
        with disk_errors(out):
            try:
                summary, lines = export_files(
                    config, student, model_dir, out, stage / out.name,
                    (examples, source, calibration),
                )  # fmt: skip
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
    if config.test is not None:
        from zmdevice.runtime import run_evaluate_onnx

        fp32 = run_evaluate_onnx(out, config.test, device="cpu")
        summary["test"] = {"data": str(config.test), "fp32_accuracy": fp32["accuracy"]}
        line = f"test {config.test}: fp32 accuracy {100 * fp32['accuracy']:.2f}%"
        if "int8" in summary:
            int8 = run_evaluate_onnx(int8_path(out), config.test, device="cpu")
            delta = 100 * (int8["accuracy"] - fp32["accuracy"])
            summary["test"].update(int8_accuracy=int8["accuracy"], int8_minus_fp32_points=delta)
            line += f", int8 {100 * int8['accuracy']:.2f}% ({delta:+.2f} points)"
        lines.append(line)
    if config.hub_folder is not None:
        card = model_card_path(out).read_text(encoding="utf-8")
        with disk_errors(Path(config.hub_folder), "--hub-folder"):
            written = write_hub_folder(Path(config.hub_folder), summary, card)
        summary["hub_folder"] = {
            "folder": str(config.hub_folder),
            "files": [str(p) for p in written],
        }
        lines.append(
            f"Hub folder: {config.hub_folder} ({', '.join(p.name for p in written)}); upload it "
            "with huggingface_hub.upload_folder(folder_path=..., repo_id=...)"
        )
    summary["lines"] = lines
    return summary
