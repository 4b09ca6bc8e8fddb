"""The registry of student families: ``@register_student(family)`` at each family's class
definition records the class in :data:`FAMILIES` under the catalog's ``family`` name, which
``build_student`` (a preset) and ``load_student`` (a saved ``config.json``) read."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zmdevice.students.base import Student

FAMILIES: dict[str, type[Student]] = {}
"""Catalog ``family`` -> its Student subclass, filled by :func:`register_student`."""


def register_student(family: str):
    """Class decorator at a student family's definition: records the class in
    :data:`FAMILIES` and sets its ``family``.

    Raises:
        TypeError: a family registered twice, or a class without a modality.
    """

    def register(cls: type[Student]) -> type[Student]:
        if family in FAMILIES and FAMILIES[family] is not cls:
            raise TypeError(f"student family '{family}' is already {FAMILIES[family].__name__}")
        if cls.modality not in ("image", "text"):
            raise TypeError(f"register_student({family!r}): {cls.__name__} has no modality")
        cls.family = family
        FAMILIES[family] = cls
        return cls

    return register
