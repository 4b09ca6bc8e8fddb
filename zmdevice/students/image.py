"""Image students: the families MobileNetV3 (torchvision) and EfficientNet-Lite (timm),
built from a catalog preset or rebuilt from ``config.json``, and their BatchNorm
recalibration.

The student is the backbone up to its pooled feature vector (MobileNetV3: pooled conv
features -> Linear -> Hardswish -> Dropout, 1024-d small / 1280-d large) plus a main head
Linear(D, C) (torchvision's own last layer); the KD head is a second Linear(D, C)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zmdevice.errors import UserError
from zmdevice.students.base import Student
from zmdevice.students.registry import register_student
from zmdevice.students.weights import load_mobilenet_imagenet_weights

# torchvision's MobileNetV3 uses BatchNorm momentum 0.01: after a short CPU run the running
# statistics lag far behind the weights and eval-mode accuracy collapses (docs/measured.md).
BATCHNORM_MOMENTUM = 0.1


class ImageStudent(Student):
    """What the image families share. Inputs: ``pixel_values`` float32 [B, 3, S, S],
    normalised."""

    modality = "image"

    def __init__(self, config: dict, backbone: nn.Module, feature_dim: int):
        """``backbone``: images -> pooled features [B, ``feature_dim``], its 1000-class layer
        already removed; its BatchNorm momentum becomes ``BATCHNORM_MOMENTUM`` and
        ``feature_dim`` is recorded in ``config["architecture"]``."""
        super().__init__(config)
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = BATCHNORM_MOMENTUM
        config["architecture"]["feature_dim"] = feature_dim
        num_classes = len(config["classes"])
        self.channels_last = False
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        init_linear(self.head)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, D] of images [B, 3, S, S] (MobileNetV3: penultimate)."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.backbone(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Main-head logits [B, C] of images [B, 3, S, S]."""
        return self.head(self.features(pixel_values))

    def use_channels_last(self) -> ImageStudent:
        """Store conv weights and feed inputs channels-last (NHWC), in place.

        Same results, much less time for MobileNetV3's depthwise convolutions on CPU
        (measured here, batch 64 at 32 px: forward+backward ~2.5x, forward ~5x faster).
        Parameters keep their identity, so an optimizer made before stays valid; saved
        weights are written in the standard layout, and ``load_student`` returns the
        standard layout (what ONNX export expects).
        """
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def _new_kd_head(self) -> nn.Module:
        head = nn.Linear(self.feature_dim, len(self.classes))
        init_linear(head)
        return head

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    @property
    def image_size(self) -> int:
        """Input side length S in pixels."""
        return int(self.config["preprocess"]["image_size"])


def init_linear(layer) -> None:
    """torchvision's MobileNetV3 classifier initialisation: N(0, 0.01), zero bias."""
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)


def _mobilenet_config(preset: str, entry: dict, classes: list[str], settings: dict) -> dict:
    """config.json content of a MobileNetV3 student."""
    variant = entry.get("variant")
    architecture: dict[str, Any] = {"family": "mobilenet_v3", "variant": variant}
    if variant == "custom":
        spec = entry.get("architecture", {})
        architecture["blocks"] = [list(block) for block in spec["blocks"]]
        architecture["last_channel"] = int(spec["last_channel"])
    elif variant not in ("small", "large"):
        raise UserError(f"catalog entry '{preset}': variant must be small, large or custom")
    return {
        "student": preset,
        "modality": "image",
        "classes": classes,
        "architecture": architecture,
        "preprocess": _image_preprocess(settings),
    }


def _image_preprocess(settings: dict) -> dict:
    """The preprocess part of an image student's config.json."""
    image_size = int(settings.get("image_size", 32))
    if image_size < 8:
        raise UserError(f"student image_size must be at least 8 pixels, got {image_size}")
    return {
        "image_size": image_size,
        "mean": [float(x) for x in settings.get("mean", [0.485, 0.456, 0.406])],
        "std": [float(x) for x in settings.get("std", [0.229, 0.224, 0.225])],
        "channel_order": "RGB",
        "resize": "bilinear",
    }


@register_student("mobilenet_v3")
class MobileNetStudent(ImageStudent):
    """torchvision's MobileNetV3 (small, large, or custom blocks from the catalog)."""

    @classmethod
    def from_config(cls, config: dict, model_dir: Path | None = None) -> MobileNetStudent:
        """The student ``config`` describes (random init, BN momentum 0.1)."""
        import torchvision
        from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

        architecture = config["architecture"]
        if architecture["variant"] == "small":
            backbone = torchvision.models.mobilenet_v3_small(weights=None)
        elif architecture["variant"] == "large":
            backbone = torchvision.models.mobilenet_v3_large(weights=None)
        else:
            blocks = [
                InvertedResidualConfig(*block, width_mult=1.0) for block in architecture["blocks"]
            ]
            backbone = MobileNetV3(blocks, last_channel=architecture["last_channel"])
        # classifier = Linear -> Hardswish -> Dropout -> Linear(D, 1000); the last layer
        # becomes the student's own head so that both heads read the same D-dim feature.
        feature_dim = backbone.classifier[-1].in_features
        backbone.classifier[-1] = nn.Identity()
        return cls(config, backbone, feature_dim)

    @classmethod
    def from_preset(
        cls, preset: str, entry: dict, weights: str, classes: list[str], settings: dict
    ) -> MobileNetStudent:
        """``weights``: "" (random), "imagenet" or an ImageNet ``.pth`` of the variant."""
        config = _mobilenet_config(preset, entry, classes, settings)
        student = cls.from_config(config)
        if weights:
            load_mobilenet_imagenet_weights(student, config["architecture"]["variant"], weights)
        return student


@register_student("efficientnet_lite")
class EfficientNetLiteStudent(ImageStudent):
    """timm's ``tf_efficientnet_lite*`` up to its pooled 1280-d feature (conv head, BN,
    ReLU6, average pool, dropout 0.2); the 1000-class layer is replaced by the heads."""

    @classmethod
    def from_config(cls, config: dict, model_dir: Path | None = None) -> EfficientNetLiteStudent:
        """The student ``config`` describes (random init, BN momentum 0.1)."""
        import timm

        architecture = config["architecture"]
        backbone = timm.create_model(architecture["timm_name"], pretrained=False, num_classes=1000)
        feature_dim = backbone.num_features
        backbone.reset_classifier(0)
        return cls(config, backbone, feature_dim)

    @classmethod
    def from_preset(
        cls, preset: str, entry: dict, weights: str, classes: list[str], settings: dict
    ) -> EfficientNetLiteStudent:
        """``weights``: "" (random), "imagenet" (the catalog's pip package) or a ``.pth``
        ImageNet state dict of the same architecture."""
        from zmdevice.catalog import catalog_weights
        from zmdevice.teachers.imagenet import load_weights_in_order

        config = {
            "student": preset,
            "modality": "image",
            "classes": classes,
            "architecture": {"family": "efficientnet_lite", "timm_name": entry["timm_name"]},
            "preprocess": _image_preprocess(settings),
        }
        student = cls.from_config(config)
        if not weights:
            return student
        if weights == "imagenet":
            if "weights_from" not in entry:
                raise UserError(f"catalog entry '{preset}' names no ImageNet weights package")
            path = catalog_weights(f"--student {preset}", entry["weights_from"])
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise UserError(f"student weights file not found: {path}")
        # The ImageNet file holds the 1000-class layer too: load it into a full model, keep
        # everything but that layer.
        import timm

        full = timm.create_model(entry["timm_name"], pretrained=False, num_classes=1000)
        load_weights_in_order(full, path)
        state = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
        student.backbone.load_state_dict(state)
        return student


def recalibrate_batchnorm(student, batches: Iterable, max_batches: int | None = None) -> int:
    """Re-estimate BatchNorm running statistics on clean, unlabeled inputs.

    The running mean/variance are reset and recomputed as a plain cumulative average over
    the given batches (momentum None), with all weights fixed; the modules' momentum and the
    student's train/eval mode are restored afterwards. docs/measured.md: +1-3 points after a short
    CPU run, no labels needed. Text students have no BatchNorm: nothing happens.

    Args:
        student: the student (any device).
        batches: pixel_values tensors [B, 3, S, S], or dicts of model inputs.
        max_batches: stop after this many batches (None = all).

    Returns:
        The number of samples used (0 when the student has no BatchNorm).
    """
    from torch import nn

    norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    device = next(student.parameters()).device
    was_training = student.training
    momenta = [m.momentum for m in norms]
    student.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average over all batches seen
        module.train()
    seen = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                if isinstance(batch, dict):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    student.features(**batch)
                    seen += len(next(iter(batch.values())))
                else:
                    student.features(batch.to(device))
                    seen += len(batch)
    finally:
        for module, momentum in zip(norms, momenta, strict=True):
            module.momentum = momentum
        student.train(was_training)
    return seen
