"""The one evaluation path of a classifier on a data set, torch-free: predict every sample in
batches (:func:`predict_in_batches`) and score the predictions against the data's labels
(:func:`evaluate_labeled`). ``evaluate models/NAME`` (``zmdevice.evaluate``, a student in
PyTorch) and ``evaluate MODEL.onnx`` (``zmdevice.runtime``) differ only in the batch
predictor they hand in."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def predict_in_batches(
    predict, count: int, num_classes: int, batch_size: int, order=None
) -> np.ndarray:
    """The one prediction loop over a data set, for a student (``zmdevice.evaluate``) and an
    exported model (``runtime.predict_dataset``) alike.

    Args:
        predict: sample indices (int64 [b]) -> their probabilities float32 [b, C].
        count: N, the number of samples.
        num_classes: C.
        batch_size: samples per call of ``predict``.
        order: the order to visit the samples in (e.g. texts by length), default 0..N-1.

    Returns:
        float32 [N, C] in sample order, whatever ``order`` was.
    """
    order = np.arange(count) if order is None else np.asarray(order)
    probs = np.zeros((count, num_classes), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        probs[indices] = predict(indices)
    return probs


def evaluate_labeled(classifier, name, data, options, owner: str, predict):
    """Score a classifier on labeled ``data``: the evaluation both ``zmdevice evaluate
    models/NAME`` (``zmdevice.evaluate``) and ``zmdevice evaluate MODEL.onnx`` run.

    Args:
        classifier: what is evaluated, with its ``classes`` (in the order of its outputs)
            and ``modality`` (a ``runtime.OnnxClassifier`` or a student).
        name: its file or folder, for the report's title.
        data: the labeled data's path; ``options`` (``config.DataOptions``) its columns.
        owner: whose classes these are, for the unknown-label error ("the model").
        predict: a ``zmdevice.data`` data set -> probabilities float32 [N, C].

    Returns:
        (``metrics.classification_report`` fields, ``metrics.format_report`` lines).
    """
    from zmdevice.data import label_indices, open_dataset
    from zmdevice.metrics import classification_report, format_report

    classes = classifier.classes
    modality = classifier.modality
    dataset = open_dataset(Path(data), options, modality=modality, require_labels=True)
    truth = label_indices(dataset, classes, owner=owner)
    probs = predict(dataset)
    report = classification_report(truth, probs.argmax(axis=1), classes)
    return report, format_report(report, classes, f"{Path(name).name} on {data}")
