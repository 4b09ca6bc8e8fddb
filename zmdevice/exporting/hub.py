"""The layout ``huggingface_hub.upload_folder`` takes (``export --hub-folder``), from an
export's files and summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zmdevice.errors import atomic_path


def write_hub_folder(folder: Path, summary: dict, card: str) -> list[Path]:
    """The layout ``huggingface_hub.upload_folder`` takes, from an export's files.

    ``README.md`` (the card, whose front matter the Hub reads), the exported ONNX file(s)
    and the tokenizer under their exported names (the ONNX metadata names the tokenizer
    file, so ``zmdevice.load(folder / NAME.onnx)`` works there), and ``config.json``
    (``hub_config``). Each file is written atomically; other files in ``folder`` are left
    alone.

    Returns:
        The files written.
    """
    config = json.dumps(hub_config(summary), indent=2) + "\n"
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for source in exported_files(summary):
        with atomic_path(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
        written.append(folder / source.name)
    for name, text in (("README.md", card), ("config.json", config)):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


def exported_files(summary: dict) -> list[Path]:
    """The model files an export's summary names: fp32, int8, tokenizer, .ort files."""
    files = [Path(summary["onnx"])]
    if summary.get("int8"):
        files.append(Path(summary["int8"]["path"]))
    if summary.get("tokenizer"):
        files.append(Path(summary["tokenizer"]))
    if summary.get("ort"):
        files += [Path(path) for path in summary["ort"]["files"]]
    return files


def hub_config(summary: dict) -> dict:
    """The Hub folder's ``config.json``: the class names (``classes``, ``id2label``,
    ``label2id``), modality, preprocessing and file names."""
    metadata = summary["metadata"]
    classes = json.loads(metadata["zmdevice.classes"])
    return {
        "library_name": "zmdevice",
        "format": metadata["zmdevice.format"],
        "format_version": int(metadata["zmdevice.format_version"]),
        "model_file": Path(summary["onnx"]).name,
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
