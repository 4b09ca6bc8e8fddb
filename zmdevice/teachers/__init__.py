"""Foundation-model teachers: frozen zero-shot classifiers behind one small interface.

``build_teacher(spec, classes)`` resolves a catalog name (``models/*.toml``) or a
``kind:spec`` string to one of the kinds below and builds it; each kind is a
:class:`~zmdevice.teachers.base.Teacher` subclass in its own module, registered at its
definition by ``@register_teacher(kind, modality=..., exports_onnx=..., int8=...,
has_features=...)``, so what a kind is and can do is written once, on its class.
``base`` holds the interface and what the kinds share.

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
from typing import Any

from zmdevice import catalog
from zmdevice.errors import UserError
from zmdevice.teachers.base import Numerics, Request, Teacher
from zmdevice.teachers.registry import REGISTRY, register_teacher

# Where each kind is defined, and nothing else about it. timm's @register_model registry is
# complete once `import timm` has imported every model module; here that would import torch
# (each kind's module imports it) on `zmdevice --help` and on every spec check. So the
# names live here, the module of a kind is imported only when that kind is asked for
# (`teacher_class`), and its decorator then fills REGISTRY with the class, which carries the
# modality and capabilities. A new kind: a module with a registered class, and one line here
# (tests/test_teachers_registry.py checks both ways).
KIND_MODULES = {
    "clip": "clip",
    "text-embed": "text_embed",
    "nli": "nli",
    "llm": "llm",
    "imagenet": "imagenet",
}
"""Teacher kind (what a spec starts with) -> its module in this package."""


def list_teachers() -> list[str]:
    """The teacher kinds, in the order the help and the errors list them."""
    return list(KIND_MODULES)


def teacher_class(kind: str) -> type[Teacher]:
    """The registered Teacher subclass of ``kind``, its module imported now (the heavy
    libraries it uses are imported when a teacher is built).

    Raises:
        KeyError: ``kind`` is not a teacher kind.
    """
    importlib.import_module(f"zmdevice.teachers.{KIND_MODULES[kind]}")
    return REGISTRY[kind]


def resolve_spec(spec: str) -> tuple[str, str, dict]:
    """Map a catalog name or ``kind:spec`` to (kind, rest, catalog entry or {}).

    Raises:
        UserError: neither a known kind nor a catalog teacher (lists the choices).
    """
    kind, _, rest = spec.partition(":")
    if kind in KIND_MODULES and rest:
        return kind, rest, {}
    # A catalog name may carry imagenet options: efficientnet-lite0:size=224.
    name, *options = spec.split(":")
    entry = catalog.find_entry(name, "teacher")
    if entry is None:
        names = ", ".join(sorted(catalog.list_entries("teacher"))) or "(none)"
        raise UserError(
            f"unknown --teacher '{spec}'{catalog.other_kind_note(name, 'teacher')}: use a "
            f"catalog name ({names}) or kind:spec with kind "
            f"one of {', '.join(list_teachers())} (e.g. clip:ViT-B-32:openai)"
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
    """The modality a teacher labels ("image" or "text"), from its spec alone (imports the
    kind's module, not the libraries its constructor loads)."""
    return teacher_class(resolve_spec(spec)[0]).modality


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

    from zmdevice.precision import Hardware, check_precision, choose_runtime

    kind, rest, entry = resolve_spec(spec)
    cls = teacher_class(kind)
    device = torch.device(device)
    chosen = choose_runtime(runtime, Hardware.probe(device), cls, check_precision(precision))
    numerics = Numerics(precision, chosen, device)
    request = Request(rest, name=spec, entry=entry, templates=templates)
    return cls(request, classes, numerics)


__all__ = [
    "KIND_MODULES",
    "REGISTRY",
    "Request",
    "Teacher",
    "build_teacher",
    "list_teachers",
    "register_teacher",
    "resolve_spec",
    "teacher_class",
    "teacher_modality",
]
