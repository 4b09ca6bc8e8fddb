"""The exported file's contract, shared by every writer of one: the ``zmdevice.*`` metadata,
saving a model as one checked file, and ``ExportError``.

``graph`` (the fp32 export), ``quantize`` (int8) and ``ort_format`` import this module; it
imports none of them, so the package's imports run one way. The contract itself (input
names, shapes, metadata keys) is documented for app developers in ``export/README.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zmdevice import __version__
from zmdevice.errors import UserError, atomic_path

FORMAT = "zmdevice-onnx"
FORMAT_VERSION = 1


class ExportError(UserError):
    """The exported graph disagrees with PyTorch (or could not be produced at all)."""


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
    """``onnx.checker``'s verdict on an in-memory model (raises when it is invalid)."""
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
