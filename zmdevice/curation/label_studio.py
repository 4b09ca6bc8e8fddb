"""Label Studio files: import-ready tasks from suggestions, labeled rows from an export.

Tasks follow Label Studio's basic JSON task format with pre-annotations
(labelstud.io/guide/predictions, /guide/task_format): a JSON list of
``{"data": {...}, "predictions": [{"model_version", "score", "result": [...]}]}`` where each
result is ``{"from_name": "label", "to_name": "text"|"image", "type": "choices",
"value": {"choices": [CLASS]}}``. The labeling config this matches is
``labeling_config(classes, modality)``. ``data`` also carries the zmdevice ``id`` (and, for
images, the local ``path``), so that an export joins back to the data by id.

An export (Label Studio's JSON export) is the same task list with ``annotations`` added;
``zmdevice.label_studio_export`` reads it back (the latest annotation of each task that is not
cancelled), and ``data.open_dataset`` reads such a file wherever labeled data goes in.
Imports nothing heavy.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from zmdevice.errors import UserError, atomic_path
from zmdevice.label_studio_export import row_content

FROM_NAME = "label"
"""The ``name`` of the Choices control in the labeling config."""
LOCAL_FILES_URL = "/data/local-files/?d="
"""Label Studio's URL prefix for files served from local storage (an export's image URLs)."""


def labeling_config(classes: list[str], modality: str) -> str:
    """The Label Studio labeling config (XML) the tasks of ``write_tasks`` fit."""
    to_name = "text" if modality == "text" else "image"
    tag = "Text" if modality == "text" else "Image"
    choices = "\n".join(f'    <Choice value="{_xml(name)}"/>' for name in classes)
    return (
        f'<View>\n  <{tag} name="{to_name}" value="${to_name}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{to_name}" choice="single">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def _xml(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def make_tasks(rows: list[dict], modality: str, model_version: str) -> list[dict]:
    """Label Studio tasks for suggestion rows.

    Args:
        rows: dicts with ``id``, ``text`` or ``path``, ``fm_guess``, ``fm_confidence``
            (the FM's probability of its guess), and optionally ``score``, ``reason``,
            ``student_guess``.
        modality: "text" or "image".
        model_version: what Label Studio shows as the prediction's model version.

    Returns:
        JSON-ready tasks, in the rows' order. The prediction's ``score`` is the FM's
        confidence (Label Studio sorts the lowest first); the suggestion's own score, rank
        and reason travel in ``data``.
    """
    to_name = "text" if modality == "text" else "image"
    tasks = []
    for rank, row in enumerate(rows, start=1):
        data = {"id": row["id"]}
        if modality == "text":
            data["text"] = row["text"]
        else:
            data["image"] = row.get("image") or row["path"]
            data["path"] = row["path"]
        data.update(
            rank=rank,
            suggest_score=row.get("score"),
            reason=row.get("reason", ""),
            student_guess=row.get("student_guess", ""),
        )
        result = {
            "from_name": FROM_NAME,
            "to_name": to_name,
            "type": "choices",
            "value": {"choices": [row["fm_guess"]]},
        }
        prediction = {
            "model_version": model_version,
            "score": float(row["fm_confidence"]),
            "result": [result],
        }
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def write_json(path: str | os.PathLike, value) -> Path:
    """``value`` as UTF-8 JSON at ``path``, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def write_labeled_csv(rows: list[dict], out: str | os.PathLike) -> Path:
    """The zmdevice labeled table (``id`` if every row has one, ``text`` or ``path``,
    ``label``) of ``rows``, as CSV written atomically.

    Image paths are written relative to the CSV's folder where they are relative to the
    current folder or absolute elsewhere (the image table reader resolves them from there).

    Raises:
        UserError: no rows, rows mixing text and images, or some rows with an id and some
            without.
    """
    out = Path(out)
    column = row_content(
        rows,
        f"no labeled rows to write to {out}: label some tasks first",
        f"rows for {out} mix texts and images; keep one kind per file",
    )
    with_id = [row.get("id") is not None for row in rows]
    if any(with_id) and not all(with_id):
        missing = with_id.index(False) + 1
        raise UserError(
            f"row {missing} for {out} has no id but others do; give every task a data.id"
        )
    header = (["id"] if all(with_id) else []) + [column, "label"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            value = row[column] if column == "text" else relative_to(row[column], out.parent)
            writer.writerow(([row["id"]] if all(with_id) else []) + [value, row["label"]])
    return out


def relative_to(path: str | os.PathLike, folder: Path) -> str:
    """``path`` (absolute, or relative to the current folder) relative to ``folder``, in
    POSIX form; absolute when they share no root."""
    absolute = Path(path).absolute()
    try:
        return Path(os.path.relpath(absolute, folder.absolute())).as_posix()
    except ValueError:  # another drive (Windows)
        return absolute.as_posix()


def write_rows_csv(rows: list[dict], out: Path, columns: list[str], modality: str) -> Path:
    """``rows`` as a CSV with ``columns`` in order, atomically. ``CONTENT`` in ``columns``
    stands for ``text`` or ``path`` by ``modality``; image paths are written relative to the
    CSV's folder, as the image-table reader resolves them."""
    out = Path(out)
    content = "text" if modality == "text" else "path"
    header = [content if column == "CONTENT" else column for column in columns]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            row = dict(row)
            if content == "path":
                row["path"] = relative_to(row["path"], out.parent)
            writer.writerow([row[column] for column in header])
    return out
