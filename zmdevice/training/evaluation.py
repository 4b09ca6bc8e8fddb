"""Evaluation of the student during and after training: predictions on clean views in eval
mode (no gradient, no random numbers), held-out agreement, test accuracy, and the BatchNorm
recalibration before saving."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zmdevice.training.stages import Stage, to_device

if TYPE_CHECKING:
    from zmdevice.training.loop import Setup


def predict(student, data, indices, batch_size: int, device):
    """Main-head predictions [N] (int64, CPU) on clean views, in eval mode."""
    was_training = student.training
    student.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            inputs = to_device(data.views.batch([("clean", chunk)]), device)
            out.append(student(**inputs).argmax(dim=1).cpu())
    student.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate_now(setup: Setup, plan: Stage) -> dict:
    """Held-out agreement with the FM (stage 1) and test accuracy (when --test is given)."""
    data, size = setup.data, setup.config.eval_batch_size
    results = {}
    if plan.selects_model:
        predicted = predict(setup.student, data, data.holdout, size, setup.device)
        results["heldout_agreement"] = float(
            (predicted == data.fm_label[data.holdout]).float().mean()
        )
        if data.gold_pool is not None:
            gold = data.gold_pool[data.holdout]
            results["heldout_gold_accuracy"] = float((predicted == gold).float().mean())
    if data.test_index is not None:
        predicted = predict(setup.student, data, data.test_index, size, setup.device)
        results["test_accuracy"] = float((predicted == data.test_y).float().mean())
    return results


def recalibration_batches(setup: Setup) -> int:
    """How many batches the BatchNorm recalibration before saving reads (0: none)."""
    config, data = setup.config, setup.data
    if data.modality != "image":
        return 0
    return min(config.bn_recalibration_batches, -(-data.num_pool // config.eval_batch_size))


def recalibrate(setup: Setup, max_batches: int | None = None) -> int:
    """Re-estimate BatchNorm statistics on clean unlabeled images (no labels), on at most
    ``max_batches`` batches (default: the ``bn_recalibration_batches`` setting)."""
    from zmdevice.students import recalibrate_batchnorm

    config, data = setup.config, setup.data
    if recalibration_batches(setup) == 0:
        return 0
    if max_batches is None:
        max_batches = config.bn_recalibration_batches
    generator = torch.Generator().manual_seed(config.seed + 2)
    order = torch.randperm(data.num_pool, generator=generator)
    size = config.eval_batch_size
    batches = (
        to_device(data.views.batch([("clean", order[start : start + size])]), setup.device)
        for start in range(0, len(order), size)
    )
    return recalibrate_batchnorm(setup.student, batches, max_batches=max_batches)


def final_test_report(setup: Setup) -> dict:
    """Accuracy, macro-F1 and per-class numbers of the saved model on --test (if given)."""
    from zmdevice.metrics import classification_report

    data = setup.data
    if data.test_index is None:
        return {}
    size = setup.config.eval_batch_size
    predicted = predict(setup.student, data, data.test_index, size, setup.device)
    report = classification_report(data.test_y.numpy(), predicted.numpy(), data.classes)
    return {
        "test_accuracy": float(report["accuracy"]),
        "test_macro_f1": float(report["macro_f1"]),
        "test_report": report,
    }
