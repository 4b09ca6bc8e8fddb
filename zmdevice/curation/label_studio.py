"""Label Studio files: import-ready tasks from suggestions, labeled rows from an export.

Tasks follow Label Studio's basic JSON task format with pre-annotations
(labelstud.io/guide/predictions, /guide/task_format): a JSON list of
``{"data": {...}, "predictions": [{"model_version", "score", "result": [...]}]}`` where each
result is ``{"from_name": "label", "to_name": "text"|"image", "type": "choices",
"value": {"choices": [CLASS]}}``. The labeling config this matches is
``labeling_config(classes, modality)``. ``data`` also carries the zmdevice ``id`` (and, for
images, the local ``path``), so that an export joins back to the data by id.

An export (Label Studio's JSON export) is the same task list with ``annotations`` added;
``read_label_studio_export`` keeps the latest annotation of each task that is not cancelled
and turns it into a zmdevice labeled row; ``open_labeled`` reads such a file (or a labeled
table) as a labeled data set. Imports nothing heavy.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from zmdevice.errors import UserError, atomic_path

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
    if not rows:
        raise UserError(f"no labeled rows to write to {out}: label some tasks first")
    column = "text" if "text" in rows[0] else "path"
    if any(column not in row for row in rows):
        raise UserError(f"rows for {out} mix texts and images; keep one kind per file")
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


def open_labeled(path: str | os.PathLike, options=None, *, modality: str | None = None):
    """A labeled data set from a table (``data.open_dataset(require_labels=True)``) or a
    Label Studio export (``.json``), read in memory without writing a table."""
    from zmdevice.data import ImageDataset, TextDataset, content_id, open_dataset

    path = Path(path)
    if path.suffix.lower() != ".json":
        return open_dataset(path, options, modality=modality, require_labels=True)
    rows = read_label_studio_export(path)
    if not rows:
        raise UserError(f"{path} has no annotated task: label some tasks in Label Studio first")
    if "text" in rows[0]:
        texts = [row["text"] for row in rows]
        ids = [row["id"] or content_id(row["text"]) for row in rows]
        dataset = TextDataset(source=path, ids=ids, texts=texts, labels=[r["label"] for r in rows])
    else:
        from zmdevice.config import DataOptions

        relative = [row["path"] for row in rows]
        for row in relative:
            if not (path.parent / row).is_file():
                raise UserError(
                    f"{path}: image file '{row}' not found (looked for {path.parent / row}); "
                    "image paths are relative to the export's folder"
                )
        dataset = ImageDataset(
            source=path,
            ids=[row["id"] or row["path"] for row in rows],
            root=path.parent,
            relative_paths=relative,
            labels=[row["label"] for row in rows],
            options=options or DataOptions(),
        )
    if modality is not None and dataset.modality != modality:
        raise UserError(f"{path} holds {dataset.modality}s, not {modality}s")
    seen: dict[str, int] = {}
    for number, sample_id in enumerate(dataset.ids, start=1):
        if sample_id in seen:
            raise UserError(
                f"{path}: annotated tasks {seen[sample_id]} and {number} have the same id "
                f"'{sample_id}'; keep one annotation per sample"
            )
        seen[sample_id] = number
    return dataset
