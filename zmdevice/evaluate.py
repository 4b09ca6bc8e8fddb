"""Evaluate a trained student (PyTorch) on labeled data: `zmdevice evaluate models/NAME`.

The student sees exactly the inputs it is trained and exported with: the ``clean`` image
view of ``zmdevice.augment`` (the twin of the numpy runtime's preprocessing) or its own
tokenizer. The exported-ONNX twin of this command is ``runtime.run_evaluate_onnx``: both go
through ``scoring.evaluate_labeled`` and its prediction loop ``scoring.predict_in_batches``
(torch-free; the torch part, the student's forward pass, is the ``predict`` given to it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from zmdevice.config import DataOptions
from zmdevice.device import resolve_device
from zmdevice.errors import UserError
from zmdevice.scoring import evaluate_labeled, predict_in_batches
from zmdevice.students import load_student


def predict_student(
    student, dataset, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Class probabilities of every sample of ``dataset``, in dataset order.

    Args:
        student: a ``Student`` (switched to eval mode, moved to ``device`` and, for images,
            to the faster channels-last layout).
        dataset: a ``zmdevice.data`` TextDataset or ImageDataset of the student's modality.
        batch_size: samples per forward pass.
        device: where the forward passes run.

    Returns:
        float32 array [N, C], rows summing to 1.
    """
    if dataset.modality != student.modality:
        raise UserError(
            f"{dataset.source} holds {dataset.modality} data but the student classifies "
            f"{student.modality}s: evaluate on {student.modality} data"
        )
    device = torch.device(device)
    student.eval().to(device).use_channels_last()
    predict, order = _batch_predictor(student, dataset, device)
    with torch.inference_mode():
        return predict_in_batches(predict, len(dataset), len(student.classes), batch_size, order)


def _batch_predictor(student, dataset, device):
    """(indices -> probabilities [b, C], the order to visit the samples in) for
    ``scoring.predict_in_batches``: the student's clean inputs of those samples, one
    forward pass, softmax."""
    if student.modality == "image":
        from zmdevice.augment import image_transforms

        preprocess = student.config["preprocess"]
        clean = image_transforms(preprocess["image_size"], preprocess["mean"], preprocess["std"])[
            "clean"
        ]

        def inputs(indices):
            pixels = torch.stack([clean(dataset.load_image(int(i))) for i in indices])
            return {"pixel_values": pixels}

        order = None
    else:

        def inputs(indices):
            input_ids, attention_mask = student.encode_texts([dataset.texts[i] for i in indices])
            return {"input_ids": input_ids, "attention_mask": attention_mask}

        # Texts of similar length share a batch, so little compute goes to padding; the
        # mask-aware pooling makes the result independent of the batch's padding.
        order = np.argsort([len(text) for text in dataset.texts], kind="stable")

    def predict(indices):
        batch = {name: value.to(device) for name, value in inputs(indices).items()}
        logits = student(**batch).float()
        return torch.softmax(logits, dim=1).cpu().numpy()

    return predict, order


def format_confusion(confusion: list[list[int]], class_names: list[str]) -> list[str]:
    """Confusion matrix as text lines: one row per true class, columns = predicted class."""
    width = max(len(name) for name in class_names)
    cell = max(4, len(str(max((max(row) for row in confusion), default=0))) + 1)
    header = " " * (width + 2) + "".join(f"{j:>{cell}}" for j in range(len(class_names)))
    lines = ["confusion (rows: true class, columns: predicted class index)", header]
    for i, (name, row) in enumerate(zip(class_names, confusion, strict=True)):
        lines.append(f"  {name:<{width}}" + "".join(f"{n:>{cell}}" for n in row) + f"  [{i}]")
    return lines


def run_evaluate_student(
    model_dir: str | Path,
    data: str | Path,
    *,
    device: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 64,
) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion of a trained student on ``data``.

    Args:
        model_dir: a folder written by ``zmdevice train`` (``students.save_student``).
        data: labeled test data of the student's modality (table with a label column, or
            an image folder with one sub-folder per class).
        device: auto, cpu, cuda, cuda:N or mps.
        text_column: the text column of a table.
        label_column: the label column of a table.
        batch_size: samples per forward pass.

    Returns:
        ``metrics.classification_report`` fields (accuracy, macro_f1, count, per_class,
        confusion) plus ``model``, ``data``, ``classes``, ``device`` and ``lines``.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = resolve_device(device)
    student = load_student(model_dir, device=torch_device)
    classes = student.classes
    options = DataOptions(text_column=text_column, label_column=label_column)
    owner = f"the student {model_dir}"
    predict = functools.partial(
        predict_student, student, batch_size=batch_size, device=torch_device
    )
    report, lines = evaluate_labeled(student, model_dir, data, options, owner, predict)
    lines += format_confusion(report["confusion"], classes)
    return {
        **report,
        "model": str(model_dir),
        "data": str(data),
        "classes": classes,
        "device": str(torch_device),
        "lines": lines,
    }
