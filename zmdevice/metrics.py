"""Classification metrics in plain numpy (used by label, evaluate and the ONNX runtime)."""

from __future__ import annotations

import math

import numpy as np


def binomial_tail(successes: int, trials: int, rate: float) -> float:
    """P(at least ``successes`` of ``trials`` independent events of probability ``rate``),
    the one-sided p-value of the tests that decide from a few labeled examples or samples."""
    if successes <= 0 or rate >= 1.0:
        return 1.0
    if rate <= 0.0 or successes > trials:
        return 0.0

    def log_term(k: int) -> float:  # in logs: comb(2000, k) overflows a float
        log_comb = math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
        return log_comb + k * math.log(rate) + (trials - k) * math.log1p(-rate)

    # Summed from above, so that tiny p-values keep their digits.
    return min(1.0, sum(math.exp(log_term(k)) for k in range(successes, trials + 1)))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts; row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def classification_report(truth: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Classes absent from both truth and predictions count 0 toward nothing: macro-F1
    averages over classes that appear in ``truth``.
    """
    truth = np.asarray(truth, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    matrix = confusion_matrix(truth, predicted, len(class_names))
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, true_positive / support, 0.0)
        precision = np.where(predicted_count > 0, true_positive / predicted_count, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "accuracy": float(true_positive.sum() / max(len(truth), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "count": int(len(truth)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion": matrix.tolist(),
    }


CLASS_ROWS_SHOWN = 20
"""Per-class rows in a text report; the rest are counted (``--json`` has them all)."""
CLASS_NAME_WIDTH = 40
"""Widest class-name column in a text report; longer names are cut."""


def format_report(report: dict, class_names: list[str], title: str) -> list[str]:
    """A one-screen text rendering of ``classification_report``'s output."""
    lines = [
        f"{title}: accuracy {100 * report['accuracy']:.1f}%  macro-F1 "
        f"{100 * report['macro_f1']:.1f}%  on {report['count']} samples"
    ]
    shown = class_names[:CLASS_ROWS_SHOWN]
    width = min(max(len(name) for name in shown), CLASS_NAME_WIDTH)
    lines.append(f"  {'class':<{width}}  recall  precision  support")
    for name in shown:
        row = report["per_class"][name]
        lines.append(
            f"  {name[:width]:<{width}}  {100 * row['recall']:5.1f}%  "
            f"{100 * row['precision']:8.1f}%  {row['support']:7d}"
        )
    if len(class_names) > len(shown):
        lines.append(f"  ... and {len(class_names) - len(shown)} more classes (all with --json)")
    return lines
