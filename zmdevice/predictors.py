"""What the Python API hands back to predict with: ``Classifier``, an exported ONNX file run
by onnxruntime (no torch), and ``TrainedStudent``, a trained student folder run by PyTorch;
plus the argument checks the API's functions share.

Items to classify are a list (or tuple, array, DataFrame, ``datasets.Dataset``): a bare
string, path, image or dict is refused rather than guessed at (``as_items``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice.config import check_device, checked_value, shown
from zmdevice.errors import UserError
from zmdevice.inputs import data_path, hf_image_column, is_dataframe, is_hf_dataset, is_pil
from zmdevice.runtime import OnnxClassifier, load_image


def check_options(options: dict, accepted: set[str], command: str) -> None:
    """UserError naming ``zmdevice.<command>`` when ``options`` has a key not ``accepted``."""
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(
            f"zmdevice.{command}: unknown option(s) {', '.join(unknown)}; "
            f"use {', '.join(sorted(accepted))}"
        )


def check_path(value: Any, name: str, expected: str) -> Path:
    """``value`` as a Path; UserError naming the argument when it is not a path."""
    if not isinstance(value, str | os.PathLike):
        raise UserError(f"{name}: expected {expected} (a path), got {shown(value)}")
    return Path(value)


def check_batch_size(value: Any) -> int:
    """``value`` as a batch size: an integer >= 1, else a UserError."""
    value = checked_value("batch_size", value, "int")
    if value < 1:
        raise UserError(f"batch_size must be >= 1, got {value}")
    return value


class ImageItems:
    """A list of PIL images or image files, read like an ``ImageDataset`` by
    ``evaluate.predict_student``."""

    modality = "image"

    def __init__(self, items: list):
        self.items = items
        self.source = Path("<images>")

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int):
        from zmdevice.images import to_rgb

        item = self.items[index]
        return to_rgb(item if is_pil(item) else load_image(Path(item)))


def as_items(items: Any, modality: str) -> list:
    """Texts (text model) or PIL images and image paths (image model), as a list.

    A single item is refused, not wrapped: a string could be one text or a list of
    characters to the caller's mind, a dict its keys; ``[item]`` says which.
    """
    wanted = "texts" if modality == "text" else "PIL images or image paths"
    if is_dataframe(items):
        column = "text" if modality == "text" else "path"
        if column not in items.columns:
            raise UserError(f"items: the DataFrame has no '{column}' column")
        items = items[column].tolist()
    elif is_hf_dataset(items):
        column = "text" if modality == "text" else hf_image_column(items)
        if column not in items.column_names:
            wanted = "'text'" if modality == "text" else "an Image"
            raise UserError(f"items: the datasets.Dataset has no {wanted} column")
        items = list(items[column])
    elif isinstance(items, str | bytes | os.PathLike | Mapping) or is_pil(items):
        raise UserError(
            f"items: pass a list of {wanted} (one item: [item]), got a single "
            f"{type(items).__name__}"
        )
    elif not isinstance(items, Iterable):
        raise UserError(f"items: pass a list of {wanted}, got {shown(items)}")
    items = list(items)
    for item in items:
        fits = (
            isinstance(item, str)
            if modality == "text"
            else is_pil(item) or isinstance(item, (str, os.PathLike))
        )
        if not fits:
            raise UserError(
                f"items: a {modality} model classifies {wanted}, got {type(item).__name__}"
            )
    return items


class Classifier(OnnxClassifier):
    """An exported model run by onnxruntime, no torch: what ``zmdevice.load`` returns.

    ``predict_proba(items)`` -> float32 [len(items), len(classes)], rows summing to 1;
    ``predict(items)`` -> one class name per item. Items are texts for a text model, PIL
    images or image file paths for an image model.
    """

    def predict_proba(self, items: Any, batch_size: int = 32) -> np.ndarray:
        batch_size = check_batch_size(batch_size)
        items = as_items(items, self.modality)
        if self.modality == "image":
            items = [item if is_pil(item) else load_image(Path(item)) for item in items]
        return super().predict_proba(items, batch_size=batch_size)

    def predict(self, items: Any) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(items).argmax(axis=1)]

    def evaluate(self, data: Any, **options: Any) -> dict:
        """Accuracy, macro-F1, per-class scores and confusion on labeled ``data``;
        ``options``: ``text_column``, ``label_column``."""
        from zmdevice.runtime import run_evaluate_onnx

        evaluate_options(options, "Classifier.evaluate", {"text_column", "label_column"})
        return run_evaluate_onnx(self.path, data_path(data, "data"), device="cpu", **options)


def evaluate_options(options: dict, command: str, accepted: set[str]) -> None:
    """The options of an ``evaluate`` method: known names, column names that are strings,
    a batch size that is a positive integer."""
    from zmdevice.config import DataOptions

    check_options(options, accepted, command)
    DataOptions(**{k: v for k, v in options.items() if k != "batch_size"})
    if "batch_size" in options:
        options["batch_size"] = check_batch_size(options["batch_size"])


class TrainedStudent:
    """A trained student folder (``models/NAME``), usable from Python through PyTorch.

    Attributes:
        out: the folder ``train`` wrote (student, config, report, metrics).
        summary: what ``train`` returned (empty when loaded from a folder).
    """

    def __init__(self, out: str | os.PathLike, summary: dict | None = None, device: str = "cpu"):
        self.out = check_path(out, "out", "a trained student folder")
        if summary is not None and not isinstance(summary, dict):
            raise UserError(f"summary must be a dict or None, got {shown(summary)}")
        self.summary = summary or {}
        self.device = check_device(device)
        self._model = None

    def __repr__(self) -> str:
        return f"TrainedStudent({str(self.out)!r})"

    @property
    def model(self):
        """The ``students.Student`` (a torch module), loaded on first use."""
        if self._model is None:
            from zmdevice.students import load_student

            self._model = load_student(self.out, device=self.device)
        return self._model

    @property
    def classes(self) -> list[str]:
        from zmdevice.students import read_student_config

        return list(read_student_config(self.out)["classes"])

    @property
    def classes_(self) -> np.ndarray:
        """The class names as a numpy array, in the order of ``predict_proba``'s columns
        (scikit-learn's attribute)."""
        return np.asarray(self.classes)

    @property
    def modality(self) -> str:
        """The student's modality, image or text, read from its folder (no torch)."""
        from zmdevice.students import read_student_config

        return read_student_config(self.out)["modality"]

    def predict_proba(self, items: Any, batch_size: int = 64) -> np.ndarray:
        """float32 [len(items), len(classes)] class probabilities, rows summing to 1."""
        from zmdevice.data import TextDataset
        from zmdevice.evaluate import predict_student

        batch_size = check_batch_size(batch_size)
        items = as_items(items, self.modality)  # checked before the model is loaded
        model = self.model
        if model.modality == "text":
            ids = [str(i) for i in range(len(items))]
            dataset = TextDataset(source=Path("<texts>"), ids=ids, texts=items)
        else:
            dataset = ImageItems(items)
        return predict_student(model, dataset, batch_size=batch_size, device=self.device)

    def predict(self, items: Any) -> list[str]:
        """One class name per item."""
        classes = self.classes
        return [classes[i] for i in self.predict_proba(items).argmax(axis=1)]

    def evaluate(self, data: Any, **options: Any) -> dict:
        """Accuracy, macro-F1, per-class scores and confusion on labeled ``data``;
        ``options``: ``text_column``, ``label_column``, ``batch_size``."""
        from zmdevice.evaluate import run_evaluate_student

        accepted = {"text_column", "label_column", "batch_size"}
        evaluate_options(options, "TrainedStudent.evaluate", accepted)
        return run_evaluate_student(
            self.out, data_path(data, "data"), device=self.device, **options
        )

    def export(self, out: str | os.PathLike | None = None, quantize: str | None = None) -> Path:
        """``zmdevice.export(self, out, quantize)``."""
        from zmdevice.api import export

        return export(self, out, quantize)
