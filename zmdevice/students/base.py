"""What every student shares: the :class:`Student` interface (backbone features, main head,
optional KD head, optimizer groups) and the names of a trained student's files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FORMAT = "zmdevice-student"


FORMAT_VERSION = 1


WEIGHTS_FILE = "student.safetensors"


CONFIG_FILE = "config.json"


TOKENIZER_FILE = "tokenizer.json"


class Student(nn.Module):
    """A backbone producing pooled features, a main head, and an optional KD head.

    Each family (a catalog entry's ``family``) is a subclass registered at its definition by
    ``registry.register_student``; it is built by ``from_preset`` (a catalog preset, with its
    initial weights) or ``from_config`` (a saved ``config.json``, random weights to load into).

    Attributes:
        family: the catalog family it is registered as ("mobilenet_v3", ...).
        modality: "image" or "text".
        config: what ``config.json`` holds (preset name, classes, architecture,
            preprocessing), enough to rebuild the module without the initial weights.
        head: main classification head, features [B, D] -> logits [B, C].
        kd_head: auxiliary head of stage 2 (None until ``attach_kd_head``).
    """

    family: str = ""
    modality: str = ""

    @classmethod
    def from_preset(
        cls, preset: str, entry: dict, weights: str, classes: list[str], settings: dict
    ) -> Student:
        """A new student of catalog ``preset`` (its ``entry``) for ``classes``.

        Args:
            weights: the initial weights ("" for random; a file, folder, hub id or
                "imagenet", as the family takes them).
            settings: the preset's preprocessing with the caller's overrides.
        """
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, model_dir: Path) -> Student:
        """The randomly initialised module that ``config`` (a saved ``config.json`` without
        its format fields) describes; ``model_dir`` holds its other files."""
        raise NotImplementedError

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.kd_head: nn.Module | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the logits."""
        return list(self.config["classes"])

    @property
    def feature_dim(self) -> int:
        """D, the size of the pooled feature both heads read."""
        return int(self.config["architecture"]["feature_dim"])

    def features(self, **inputs) -> torch.Tensor:
        """Pooled features [B, D] of a batch (see the subclass for the inputs)."""
        raise NotImplementedError

    def _new_kd_head(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, **inputs) -> torch.Tensor:
        """Main-head logits [B, C]."""
        return self.head(self.features(**inputs))

    def attach_kd_head(self, seed: int | None = None) -> nn.Module:
        """Add a new, randomly initialised KD head beside the main head and return it.

        The head is created on the device and dtype of the main head. With a ``seed`` its
        initialisation depends on that seed only and the global RNG is left untouched;
        without, it draws from the global RNG like any new module.
        """
        reference = next(self.head.parameters())
        if seed is None:
            head = self._new_kd_head()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = self._new_kd_head()
        self.kd_head = head.to(device=reference.device, dtype=reference.dtype)
        return self.kd_head

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of everything but the heads."""
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the main head and, when attached, the KD head."""
        params = list(self.head.parameters())
        if self.kd_head is not None:
            params += list(self.kd_head.parameters())
        return params

    def parameter_groups(
        self,
        lr_backbone: float,
        lr_heads: float,
        weight_decay: float = 0.0,
        freeze_word_embeddings: bool = False,
    ) -> list[dict]:
        """Optimizer parameter groups: backbone and heads at their own learning rates.

        Weight decay applies to matrices and kernels only, not to biases and norm
        scales (the usual AdamW practice). ``freeze_word_embeddings`` (text students)
        sets ``requires_grad = False`` on the word-embedding matrix and leaves it out:
        on CPU that cuts the AdamW step about 4x for the MiniLM-sized DistilBERT
        (docs/measured.md). Image students ignore it.

        Returns:
            Up to four dicts with ``params``, ``lr``, ``weight_decay`` and ``name``
            (backbone/heads x decay/no_decay), empty groups left out.
        """
        if freeze_word_embeddings:
            self.freeze_word_embeddings()
        groups = []
        for name, params, lr in (
            ("backbone", self.backbone_parameters(), lr_backbone),
            ("heads", self.head_parameters(), lr_heads),
        ):
            trainable = [p for p in params if p.requires_grad]
            decay = [p for p in trainable if p.ndim >= 2]
            no_decay = [p for p in trainable if p.ndim < 2]
            if decay:
                groups.append(
                    {"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay}
                )
            if no_decay:
                groups.append(
                    {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
                )
        return groups

    def freeze_word_embeddings(self) -> None:
        """Stop training the word-embedding matrix (text students; no-op otherwise)."""

    def use_channels_last(self) -> Student:
        """Switch to the faster channels-last memory layout (image students; no-op for text).

        Returns the student itself.
        """
        return self


def count_parameters(module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
