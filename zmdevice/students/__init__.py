"""Student models: MobileNetV3 for images, DistilBERT for text, tiny presets for tests.

A student is a backbone that maps inputs to one pooled feature vector per sample, plus a
main classification head on that feature. Stage 2 of ZeroMatch attaches an auxiliary "KD
head" beside the main head (``attach_kd_head``); it never leaves training: ``save_student``
drops it, so export and inference see the main head only.

Where the heads sit (both heads read the same feature, so one backbone pass feeds both):

- images: torchvision's MobileNetV3 up to its penultimate layer, i.e. pooled conv features
  -> Linear -> Hardswish -> Dropout, a 1024-d (small) / 1280-d (large) vector. The main
  head is torchvision's own last Linear(D, C); the KD head is a second Linear(D, C), as in
  the reference runs' ViT (a linear layer on the pooled feature).
- text: DistilBERT's last hidden states, dropout 0.1, mean-pooled over real tokens (the
  attention mask). The main head and the KD head are both Linear(D, D) -> GELU ->
  Linear(D, C), the classifier of USB's BERT student that ZeroMatch builds on.

Presets come from the catalog (``models/*.toml`` with ``kind = "student"``); a name may
carry a weight source after a colon: ``mobilenet_v3_small:/path/imagenet.pth``,
``distilbert:/path/to/model_dir`` or ``distilbert:<hub id>``.

Modules: ``base`` (the Student interface, file names), ``registry`` (the families), ``image``
(MobileNetV3, EfficientNet-Lite, BatchNorm recalibration), ``text`` (DistilBERT,
tokenisation), ``weights`` (ImageNet / offline / hub weights, BERT -> DistilBERT remap),
``io`` (save, load). Each family is a Student subclass registered at its definition
(``@register_student("mobilenet_v3")``) into ``FAMILIES``, which ``build_student`` and
``load_student`` read.

Unlike the teachers, the families register eagerly, as timm's models do: importing this
package imports ``image`` and ``text``, which cost torch and nothing more (torchvision,
timm, transformers and safetensors are imported inside the functions), and torch is
imported here anyway: students sit above the ground floor and the CLI imports them only
inside the commands that build or load one.
"""

from __future__ import annotations

import torch

from zmdevice.catalog import list_entries, require_entry
from zmdevice.errors import UserError
from zmdevice.students.base import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Student,
    count_parameters,
)
from zmdevice.students.image import (
    BATCHNORM_MOMENTUM,
    EfficientNetLiteStudent,
    ImageStudent,
    MobileNetStudent,
    recalibrate_batchnorm,
)
from zmdevice.students.io import load_student, read_student_config, save_student
from zmdevice.students.registry import FAMILIES, register_student
from zmdevice.students.text import (
    TextStudent,
    encode_token_ids,
    pad_token_ids,
    tiny_tokenizer,
)
from zmdevice.students.weights import distilbert_from_bert


def _split_name(name: str) -> tuple[str, str | None]:
    """'preset' or 'preset:weight source' -> (preset, source or None)."""
    preset, sep, source = name.partition(":")
    return preset.strip(), (source.strip() if sep else None)


def student_names() -> list[str]:
    """The student presets in the catalog."""
    return sorted(list_entries("student"))


def build_student(
    name: str,
    classes: list[str],
    *,
    seed: int = 0,
    preprocess: dict | None = None,
):
    """Build a student for ``classes`` from a catalog preset.

    Args:
        name: catalog preset (``mobilenet_v3_small``, ``mobilenet_v3_large``,
            ``distilbert``, ``tiny-mobilenet``/``tiny-cnn``, ``tiny-distilbert``), optionally
            ``preset:source`` where source overrides the preset's initial weights: an
            ImageNet ``.pth`` file (or ``imagenet``) for MobileNetV3, a model folder or hub
            id for DistilBERT.
        classes: class names; the heads get ``len(classes)`` outputs.
        seed: seed of the random initialisation (the global RNG is left untouched).
        preprocess: overrides of the preset's preprocessing, e.g. ``{"image_size": 64}``
            or ``{"max_length": 64}``.

    Returns:
        A ``Student`` (``ImageStudent`` or ``TextStudent``) in training mode, on the CPU.
    """

    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UserError(f"a student needs at least 2 distinct classes, got {list(classes)}")
    preset, source = _split_name(name)
    entry = require_entry(preset, "student", "--student")
    weights = entry.get("weights", "") if source is None else source
    settings = dict(entry.get("preprocess", {}))
    settings.update(preprocess or {})
    family = entry.get("family")
    if family not in FAMILIES:
        raise UserError(f"catalog entry '{preset}' has unknown family '{family}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = FAMILIES[family].from_preset(preset, entry, weights, list(classes), settings)
    student.config["weights"] = weights or "random"
    return student.train()


__all__ = [
    "BATCHNORM_MOMENTUM",
    "CONFIG_FILE",
    "FAMILIES",
    "FORMAT",
    "FORMAT_VERSION",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "EfficientNetLiteStudent",
    "ImageStudent",
    "MobileNetStudent",
    "Student",
    "TextStudent",
    "build_student",
    "count_parameters",
    "distilbert_from_bert",
    "encode_token_ids",
    "load_student",
    "pad_token_ids",
    "read_student_config",
    "recalibrate_batchnorm",
    "register_student",
    "save_student",
    "student_names",
    "tiny_tokenizer",
]
