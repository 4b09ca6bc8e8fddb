"""What follows the data's modality (image or text) when the user leaves it out: the
training defaults of ``TrainConfig`` (``MODALITY_DEFAULTS``, applied by
``TrainConfig.for_modality``), the default student and teacher, and ``resolve_student``,
the one rule the CLI and the API share for the student.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from zmdevice.config_checks import ConfigError

if TYPE_CHECKING:
    from zmdevice.config import TrainConfig

# Why da_momentum 0.99 and not USB's 0.999: 0.999 averages over ~1,000 steps, longer than a
# whole CPU stage 2 (150-500 steps). After stage 1, p_model starts at the student's first
# batch, i.e. the FM's skewed class distribution, and then lags behind the student, so
# alignment keeps boosting classes the FM under-predicted. Chosen on the dev split
# (Fashion-MNIST, 40 labels, refined labels, 500 + 500 steps, seeds 0 / 1 / 2): 0.99 gave
# 65.0 / 74.7 / 67.4, 0.999 gave 65.0 / 73.8 / 66.5 (benchmarks/results/dev-images-*).
_BY_FIELD = {  # field: (image, text)
    "kd_steps": (500, 150),
    "ssl_steps": (500, 150),
    "kd_batch_size": (64, 32),
    "unlabeled_batch_size": (64, 16),
    "lr": (2e-3, 1e-4),
    "head_lr": (2e-3, 1e-3),
    "weight_decay": (5e-4, 0.01),
    "warmup": (0.05, 0.1),
    "grad_clip": (0.0, 1.0),
}
MODALITY_DEFAULTS = {
    modality: {key: pair[column] for key, pair in _BY_FIELD.items()}
    for column, modality in enumerate(("image", "text"))
}
"""CPU defaults of the TrainConfig fields that depend on the student's modality."""


DEFAULT_STUDENTS = {"image": "efficientnet_lite0", "text": "distilbert"}
"""The student trained when none is named, by the labeled data's modality: the offline
default of each."""
DEFAULT_TEACHERS = {"image": "efficientnet-lite0", "text": "minilm"}
"""The FM ``train`` labels with when given no pseudo-labels: the offline default of each
modality (the catalog's ``models/*.toml``)."""


def resolve_student(config: TrainConfig) -> TrainConfig:
    """``config`` with its student settled: the one named, checked to fit the labeled data's
    modality, else that modality's ``DEFAULT_STUDENTS`` entry. The one rule of the CLI and
    the API: ``run_train`` applies it before anything else.

    Raises:
        UserError: the labeled data cannot be opened, the student is not in the catalog, or
            it is a model of the other modality.
    """
    from zmdevice.catalog import list_entries, require_entry
    from zmdevice.data import open_dataset

    modality = open_dataset(config.labeled).modality
    if config.student is None:
        return dataclasses.replace(config, student=DEFAULT_STUDENTS[modality])
    preset = config.student.partition(":")[0].strip()
    kind = require_entry(preset, "student", "--student").get("modality", "image")
    if kind != modality:
        fitting = sorted(
            name
            for name, entry in list_entries("student").items()
            if entry.get("modality", "image") == modality
        )
        article = "an" if kind == "image" else "a"
        raise ConfigError(
            "student",
            f"--student {config.student} is {article} {kind} model but --labeled "
            f"{config.labeled} holds {modality} data: use a {modality} student "
            f"({', '.join(fitting)}) or leave --student out for {DEFAULT_STUDENTS[modality]}",
        )
    return config
