"""Foundation-model teachers: frozen zero-shot classifiers behind one small interface.

``build_teacher(spec, classes)`` resolves a catalog name (``models/*.toml``) or a
``kind:spec`` string to one of the kinds below and builds it; each kind is a
:class:`~zmdevice.teachers.base.Teacher` subclass in its own module, imported only when a
teacher of that kind is built (so ``teacher_modality`` and the error messages need none of
open_clip, transformers or timm). ``base`` holds the interface and what the kinds share.

- ``clip:<arch>:<pretrained tag or checkpoint file>`` (``clip.py``): open_clip, prompts from
  templates; softmax(logit_scale * cosine).
- ``text-embed:<model dir or hub id>`` (``text_embed.py``): sentence embeddings of the text
  against the class descriptions; softmax(100 * cosine).
- ``nli:<model>`` (``nli.py``): one entailment hypothesis per class.
- ``llm:<model>[:score]`` (``llm.py``): an instruction LM's answer mapped to a class, else the
  class-name likelihoods.
- ``imagenet:<timm model>[:<weights file>]`` (``imagenet.py``): an ImageNet-1k classifier
  whose classes are mapped to the target classes.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from zmdevice import catalog
from zmdevice.errors import UserError
from zmdevice.teachers.base import Numerics, Request, Teacher


class Kind(NamedTuple):
    """Where a teacher kind lives: ``zmdevice.teachers.<module>.<cls>``."""

    module: str
    cls: str
    modality: str


KINDS = {
    "clip": Kind("clip", "ClipTeacher", "image"),
    "text-embed": Kind("text_embed", "TextEmbedTeacher", "text"),
    "nli": Kind("nli", "NliTeacher", "text"),
    "llm": Kind("llm", "LlmTeacher", "text"),
    "imagenet": Kind("imagenet", "ImagenetTeacher", "image"),
}
"""The teacher kinds, by the name a spec starts with."""


def teacher_class(kind: str) -> type[Teacher]:
    """The Teacher subclass of ``kind``, its module imported now (heavy imports deferred)."""
    entry = KINDS[kind]
    return getattr(importlib.import_module(f"zmdevice.teachers.{entry.module}"), entry.cls)


def resolve_spec(spec: str) -> tuple[str, str, dict]:
    """Map a catalog name or ``kind:spec`` to (kind, rest, catalog entry or {}).

    Raises:
        UserError: neither a known kind nor a catalog teacher (lists the choices).
    """
    kind, _, rest = spec.partition(":")
    if kind in KINDS and rest:
        return kind, rest, {}
    # A catalog name may carry imagenet options: efficientnet-lite0:size=224.
    name, *options = spec.split(":")
    entry = catalog.find_entry(name, "teacher")
    if entry is None:
        names = ", ".join(sorted(catalog.list_entries("teacher"))) or "(none)"
        raise UserError(
            f"unknown --teacher '{spec}': use a catalog name ({names}) or kind:spec with kind "
            f"one of {', '.join(KINDS)} (e.g. clip:ViT-B-32:openai)"
        )
    kind, _, rest = entry["spec"].partition(":")
    source = entry.get("weights_from")
    if source:
        weights = catalog.catalog_weights(f"--teacher {name}", source)
        rest = rest.replace("{weights}", str(weights))
    if options:
        if kind != "imagenet" or not all("=" in option for option in options):
            raise UserError(
                f"--teacher {spec}: only imagenet teachers take options (size=N, map=FILE)"
            )
        rest = ":".join([rest, *options])
    return kind, rest, entry


def teacher_modality(spec: str) -> str:
    """The modality a teacher labels ("image" or "text"), from its spec alone."""
    return KINDS[resolve_spec(spec)[0]].modality


def build_teacher(
    spec: str,
    classes,
    *,
    device: Any = "cpu",
    templates: str | None = None,
    precision: str = "fp32",
    runtime: str = "torch",
) -> Teacher:
    """Build a frozen teacher for ``classes`` (a ``zmdevice.classes.ClassList``).

    Args:
        spec: catalog name (``minilm``, ``efficientnet-lite0``) or ``kind:spec``.
        classes: the target classes with optional per-class prompts.
        device: torch device (or its name) the model runs on.
        templates: CLIP templates: None/"paper", "openai", or a file with one per line.
        precision: auto, fp32, bf16 or fp16 (``zmdevice.precision``); class weights and
            probabilities are computed in fp32 whatever the network runs in.
        runtime: auto, torch, onnx or onnx-int8 (``zmdevice.precision.choose_runtime``).

    Raises:
        UserError: unknown teacher, missing weights, unusable model, a precision or
            runtime this teacher or device cannot use.
    """
    import torch

    from zmdevice.precision import check_precision, choose_runtime

    kind, rest, entry = resolve_spec(spec)
    device = torch.device(device)
    numerics = Numerics(
        check_precision(precision), choose_runtime(runtime, device.type, kind, precision), device
    )
    request = Request(rest, name=spec, entry=entry, templates=templates)
    return teacher_class(kind)(request, classes, numerics)


__all__ = [
    "KINDS",
    "Request",
    "Teacher",
    "build_teacher",
    "resolve_spec",
    "teacher_class",
    "teacher_modality",
]
