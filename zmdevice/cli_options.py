"""Typer options made from the config dataclasses: each flag, default and help line is
written once, as a field of ``zmdevice.config`` (or ``zmdevice.demo``) and its docstring.

``config_options(cls)`` gives a command one option per field of ``cls`` (``data_options``
flattened into its own fields): the flag is the field's name (``kd_steps`` ->
``--kd-steps``, a bool ``--resume/--no-resume``), the type the field's, the help text the
field's attribute docstring (read once from the module's source with ``ast``) and the
default the field's (a None default that the data's modality settles is described). The
command's own parameters (``--config``, ``--json``, ...) are declared in its signature as
usual; the generated ones are added to it through ``__signature__``, which typer reads like
any signature.

The command receives only the flags the user typed (click's parameter source), so that an
untyped flag never overrides a ``--config`` file (``load_config``); with ``every_value``
(``predict``, ``evaluate``) it receives every value, defaults included.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from zmdevice.config import (
    DEFAULT_STUDENTS,
    DEFAULT_TEACHERS,
    MODALITY_DEFAULTS,
    LabelConfig,
    TrainConfig,
)

BY_MODALITY = {"student": DEFAULT_STUDENTS, "teacher": DEFAULT_TEACHERS}
"""Fields whose default (None) is chosen by the data's modality, and how."""
MODALITY_CONFIGS = (LabelConfig, TrainConfig)
"""The configs whose None defaults the data's modality settles (elsewhere a ``student`` is a
folder and a ``teacher`` None means the label file's)."""


@functools.cache
def _class_docs(source_file: str) -> dict[str, dict[str, str]]:
    """Class name -> field -> its attribute docstring (the string right after the field),
    for every class of one source file."""
    tree = ast.parse(Path(source_file).read_text(encoding="utf-8"))
    docs = {}
    for node in tree.body:  # the configs are top-level classes
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for item, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[item.target.id] = " ".join(after.value.value.split())
    return docs


TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path, "list[str]": list[str]}
"""The field annotations (strings, as ``config_checks.FIELD_TYPES`` reads them) as types;
looked up rather than evaluated, which keeps ``zmdevice --help`` fast."""


def option_type(item: dataclasses.Field, optional: bool) -> object:
    """The type of a field's option (``X | None`` when the flag may be left out)."""
    kinds = [part.strip() for part in str(item.type).split("|")]
    annotation = TYPES[next(kind for kind in kinds if kind != "None")]
    return annotation | None if optional or "None" in kinds else annotation


def field_docs(cls) -> dict[str, str]:
    """Field name -> the field's docstring on one line (missing: no docstring); fields a
    config inherits keep the docstrings of the class that declares them."""
    docs = {}
    for owner in reversed(cls.__mro__):
        if dataclasses.is_dataclass(owner):
            source = sys.modules[owner.__module__].__file__
            docs.update(_class_docs(source).get(owner.__name__, {}))
    return docs


def command_fields(cls) -> list[tuple[type, dataclasses.Field]]:
    """(owning class, field) for each setting of ``cls``, ``data_options`` flattened."""
    found = []
    for item in dataclasses.fields(cls):
        if item.name == "data_options":
            nested = item.default_factory
            found += [(nested, inner) for inner in dataclasses.fields(nested)]
        else:
            found.append((cls, item))
    return found


def flag(name: str) -> str:
    """The long flag of a field: ``kd_steps`` -> ``--kd-steps``."""
    return "--" + name.replace("_", "-")


def help_text(doc: str, names: set[str]) -> str:
    """A field docstring as help: ````field```` of the same command becomes its flag, other
    ````code```` loses its backticks."""

    def literal(match: re.Match) -> str:
        word = match.group(1)
        return flag(word) if word in names else word

    return re.sub(r"``([^`]+)``", literal, doc)


def default_text(cls, item: dataclasses.Field) -> str | bool:
    """What ``--help`` says of a field whose default (None) is chosen later; True: the value."""
    if item.default is not None:
        return True
    if cls not in MODALITY_CONFIGS:
        return False
    if item.name in BY_MODALITY:
        choices = BY_MODALITY[item.name].items()
        return "by the data: " + ", ".join(f"{name} for {m}" for m, name in choices)
    if item.name in MODALITY_DEFAULTS["image"]:
        by = ", ".join(f"{table[item.name]} for {m}" for m, table in MODALITY_DEFAULTS.items())
        return f"the student preset's, else {by}"
    return False


def field_parameter(
    cls, item: dataclasses.Field, names: set[str], positional: bool, note: str = ""
) -> inspect.Parameter:
    """The typer parameter of one field (see the module docstring); ``note`` ends its help."""
    doc = " ".join([help_text(field_docs(cls).get(item.name, ""), names), note]).strip()
    if positional:
        info = typer.Argument(help=doc, show_default=False)
    else:
        info = typer.Option(help=doc, show_default=default_text(cls, item))
    required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
    # A required field may come from --config: typer must not require its flag.
    annotation = option_type(item, optional=required)
    return inspect.Parameter(
        item.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[annotation, info],
        default=None if required else item.default,
    )


def typed(context: typer.Context, names: set[str]) -> set[str]:
    """Which of the running command's parameters ``names`` the user typed."""

    def untyped(name: str) -> bool:
        source = context.get_parameter_source(name)
        return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")

    return {name for name in names if not untyped(name)}


def config_options(
    cls,
    *,
    only: tuple[str, ...] | None = None,
    positional: tuple[str, ...] = (),
    every_value: bool = False,
    notes: dict[str, str] | None = None,
):
    """Decorator: add an option for each field of ``cls`` (or those in ``only``) to the
    command's signature, ``positional`` ones as arguments, before its own parameters.

    Args:
        cls: a config dataclass whose fields carry attribute docstrings.
        only: the fields to expose; None: all of them.
        positional: fields given as command-line arguments rather than flags.
        every_value: pass the command every field's value; False: only those the user typed
            (what ``load_config`` merges over a ``--config`` file).
        notes: field -> text appended to its help (what the docstring points to).
    """
    settings = command_fields(cls)
    if only is not None:
        settings = [(owner, item) for owner, item in settings if item.name in only]
    names = {item.name for _, item in settings}
    settings.sort(key=lambda pair: pair[1].name not in positional)

    def decorate(command):
        made = [
            field_parameter(
                owner, item, names, item.name in positional, (notes or {}).get(item.name, "")
            )
            for owner, item in settings
        ]
        own = inspect.signature(command, eval_str=True).parameters.values()
        kept = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.kind != p.VAR_KEYWORD]

        @functools.wraps(command)
        def run(typer_context: typer.Context, **values):
            if not every_value:
                chosen = typed(typer_context, names)
                values = {k: v for k, v in values.items() if k not in names or k in chosen}
            return command(**values)

        context = inspect.Parameter(
            "typer_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        run.__signature__ = inspect.Signature([context, *made, *kept])
        return run

    return decorate
