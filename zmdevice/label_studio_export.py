"""Reading a Label Studio JSON export: the labeled rows it holds (``data.open_dataset``
reads a ``.json`` file through ``read_label_studio_export``, so every ``--labeled``,
``--few-shot`` and ``--gold`` takes one; writing tasks is ``curation.label_studio``).

An export is the task list Label Studio's basic JSON format describes
(labelstud.io/guide/task_format, /guide/export) with ``annotations`` added; each task's
latest annotation that is not cancelled gives its class. Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from zmdevice.errors import UserError


def _load_json(path: Path):
    if not path.is_file():
        raise UserError(f"Label Studio file not found: {path}; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} is not a JSON file ({error}); export the project from Label Studio as JSON"
        ) from None


def read_label_studio_export(path: str | os.PathLike, from_name: str | None = None) -> list[dict]:
    """Labeled rows from a Label Studio JSON export (or a task file with annotations).

    Each task gives one row ``{"id": str | None, "text": str}`` or ``{"id", "path": str}``
    plus ``"label"``: the choice of its most recent annotation that is not cancelled
    (``was_cancelled``) and not empty. Tasks without such an annotation are left out.
    The id is ``data.id`` (the zmdevice id that ``make_tasks`` wrote), else None; the image
    path is ``data.path``, else ``data.image`` (a local-files URL is turned back into its
    path).

    Args:
        path: the export file (a JSON list of tasks).
        from_name: the Choices control to read; None: the only one with choices.

    Raises:
        UserError: not JSON, not a list of tasks, a task without text or image, a multiple
            choice, or choices of several controls and no ``from_name``.
    """
    path = Path(path)
    tasks = _load_json(path)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UserError(
            f"{path} is not a Label Studio export (a JSON list of tasks); export as JSON, "
            "not JSON-MIN or CSV"
        )
    rows = []
    for number, task in enumerate(tasks, start=1):
        where = f"task {number} (Label Studio id {task.get('id', '?')}) of {path}"
        data = task.get("data")
        if not isinstance(data, dict):
            raise UserError(f"{where} has no 'data' object; export as JSON, not JSON-MIN")
        label = _latest_choice(task.get("annotations") or [], from_name, where)
        if label is None:
            continue
        sample_id = data.get("id")
        row = {"id": None if sample_id is None else str(sample_id)}
        if "text" in data:
            row["text"] = str(data["text"])
        elif "path" in data or "image" in data:
            row["path"] = str(data.get("path") or _local_path(str(data["image"])))
        else:
            raise UserError(f"{where} has neither data.text nor data.image")
        row["label"] = label
        rows.append(row)
    return rows


def _latest_choice(annotations: list, from_name: str | None, where: str) -> str | None:
    """The single choice of the most recent usable annotation, or None."""
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    # Most recent last: Label Studio's ISO timestamps sort as strings; the list order breaks
    # ties (and stands in when there are none).
    order = sorted(range(len(usable)), key=lambda i: (str(usable[i].get("updated_at") or ""), i))
    for index in reversed(order):
        choices = {}
        for result in usable[index].get("result") or []:
            value = result.get("value") if isinstance(result, dict) else None
            if result.get("type") == "choices" and isinstance(value, dict):
                choices[result.get("from_name")] = value.get("choices") or []
        if from_name is not None:
            choices = {k: v for k, v in choices.items() if k == from_name}
        choices = {k: v for k, v in choices.items() if v}
        if not choices:
            continue
        if len(choices) > 1:
            raise UserError(
                f"{where} has choices of several controls ({', '.join(map(str, choices))}): "
                "name the one holding the class"
            )
        (picked,) = choices.values()
        if len(picked) != 1:
            raise UserError(
                f"{where} has {len(picked)} choices ({', '.join(map(str, picked))}); zmdevice "
                'needs one class per sample: use choice="single"'
            )
        return str(picked[0])
    return None


def _local_path(url: str) -> str:
    """``/data/local-files/?d=a/b.png`` -> ``a/b.png``; other values unchanged."""
    parsed = urlparse(url)
    if parsed.path.rstrip("/").endswith("/data/local-files") and "d" in parse_qs(parsed.query):
        return unquote(parse_qs(parsed.query)["d"][0])
    return url


def row_content(rows: list[dict], empty: str, mixed: str) -> str:
    """``"text"`` or ``"path"``: the one kind of sample ``rows`` (``read_label_studio_export``'s)
    hold; ``UserError(empty)`` without rows, ``UserError(mixed)`` for both kinds."""
    if not rows:
        raise UserError(empty)
    content = "text" if "text" in rows[0] else "path"
    if any(content not in row for row in rows):
        raise UserError(mixed)
    return content
