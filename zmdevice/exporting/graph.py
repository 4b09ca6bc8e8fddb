"""A trained student as one self-contained ONNX file, checked against PyTorch.

``export_student`` is the library function: main head only, output ``logits``, dynamic
batch (and sequence length for text), the zmdevice metadata in ``metadata_props``
(``onnx_file``), and an onnxruntime-vs-PyTorch parity check on real inputs (``parity``)
before the file appears under its name.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zmdevice.config import ExportConfig, check_opset
from zmdevice.errors import atomic_paths
from zmdevice.exporting.onnx_file import (
    ExportError,
    onnx_checked,
    onnx_metadata,
    strip_debug_info,
    write_metadata,
    write_model,
)
from zmdevice.exporting.parity import (
    PARITY_TOLERANCE,
    ParityReport,
    check_parity,
    parity_examples,
    parity_feeds,
)


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
    check_opset(opset)
    out_path = Path(out_path)
    student = student.cpu().eval()
    tokenizer_name = f"{out_path.stem}.tokenizer.json" if student.modality == "text" else None
    metadata = onnx_metadata(student, opset, tokenizer_name)
    preprocess = json.loads(metadata["zmdevice.preprocess"])
    examples, inputs = parity_examples(student.modality, preprocess, examples, examples_source)
    feeds = parity_feeds(student, examples, _runtime_tokenizer(student, preprocess))
    # Trace with a batch > 1 (dynamo specialises a batch of 1) and, for text, padding.
    model_proto = _trace_graph(student, feeds[1], opset)
    strip_debug_info(model_proto)
    write_metadata(model_proto, metadata)
    parity = check_parity(student, model_proto.SerializeToString(), feeds, inputs, tolerance)
    onnx_checked(model_proto)
    tokenizer_path = out_path.parent / tokenizer_name if tokenizer_name else None
    _write_model_and_tokenizer(model_proto, out_path, student, tokenizer_path)
    size = out_path.stat().st_size
    return ExportResult(out_path, opset, size, parity, metadata, tokenizer_path)


def _runtime_tokenizer(student, preprocess: dict):
    """A text student's tokenizer set up as the runtime sets it up (None for images)."""
    if student.modality != "text":
        return None
    from tokenizers import Tokenizer

    from zmdevice.runtime import configure_tokenizer

    # A private copy: configure_tokenizer changes padding/truncation settings.
    return configure_tokenizer(Tokenizer.from_str(student.tokenizer.to_str()), preprocess)


def _write_model_and_tokenizer(model_proto, out_path: Path, student, tokenizer_path) -> None:
    """The model and (text) its tokenizer appear together or not at all (a full disk)."""
    with atomic_paths(out_path, *([tokenizer_path] if tokenizer_path else [])) as temporary:
        write_model(model_proto, temporary[0])
        if tokenizer_path:
            # The student's own file, untouched: the runtime applies the metadata settings.
            temporary[1].write_text(student.tokenizer.to_str(), encoding="utf-8")
