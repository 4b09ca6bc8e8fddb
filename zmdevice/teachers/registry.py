"""The registry of teacher kinds: ``@register_teacher`` at each kind's class definition
records its name, modality and capabilities on the class and the class in :data:`REGISTRY`
(the pattern of timm's ``_registry.py``; which module defines which kind, and the lazy
import, is ``zmdevice.teachers.KIND_MODULES``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zmdevice.teachers.base import Teacher

REGISTRY: dict[str, type[Teacher]] = {}
"""Kind name -> its Teacher subclass, filled by :func:`register_teacher` as each kind's module
is imported (``zmdevice.teachers.teacher_class`` imports it on demand)."""


def register_teacher(
    kind: str,
    *,
    modality: str,
    exports_onnx: bool = False,
    int8: bool = False,
    has_features: bool = False,
):
    """Class decorator at a teacher kind's definition: records the kind in :data:`REGISTRY`
    and its name, modality and capabilities as class attributes (see :class:`Teacher`).

    Raises:
        TypeError: a kind registered twice, an unknown modality, ``int8`` without
            ``exports_onnx``, or ``has_features`` that disagrees with the class (a method
            ``features_and_probs`` exactly when it has features).
    """

    def register(cls: type[Teacher]) -> type[Teacher]:
        problems = []
        if kind in REGISTRY and REGISTRY[kind] is not cls:
            problems.append(f"kind '{kind}' is already {REGISTRY[kind].__qualname__}")
        if modality not in ("text", "image"):
            problems.append(f"modality '{modality}' is neither text nor image")
        if int8 and not exports_onnx:
            problems.append("int8 needs exports_onnx (it quantises the ONNX export)")
        if has_features != (cls.features_and_probs is not None):
            problems.append("has_features must match whether features_and_probs is a method")
        if problems:
            raise TypeError(
                f"register_teacher({kind!r}) on {cls.__qualname__}: " + "; ".join(problems)
            )
        cls.kind, cls.modality = kind, modality
        cls.exports_onnx, cls.int8, cls.has_features = exports_onnx, int8, has_features
        REGISTRY[kind] = cls
        return cls

    return register
