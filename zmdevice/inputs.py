"""In-memory data for the Python API, written once to files the stages read.

Wherever the CLI takes a data path, the API also takes a pandas DataFrame (columns as in a
table file), a list of strings or of ``(text, label)`` pairs, or a list of PIL images or
image paths (alone or in ``(image, label)`` pairs). Such data is written once, under a name
derived from its content, to the input cache (``$ZMDEVICE_CACHE``, else
``$XDG_CACHE_HOME/zmdevice``, else ``~/.cache/zmdevice``), and the stage reads that file.
Texts therefore get the content-derived ids and the fingerprint that the same texts get in a
table on disk, and a pseudo-label file made from a list fits ``train`` on the same list. A
list of image paths is read as the folder that holds them (ids relative to it); a PIL image
gets the id ``i`` + 16 hex digits of the SHA-1 of its pixels + ``.png``. Class lists given
as Python lists or dicts become what ``--classes`` takes.

A Hugging Face ``datasets.Dataset`` is taken wherever a DataFrame is, and a folder written by
its ``save_to_disk`` wherever a data path is (``zmdevice.data.open_dataset`` reads it through
``saved_dataset_table``, so every command does): its ``text``, ``label`` and ``id`` columns
are a table's, a ``ClassLabel`` column gives its class names (one that is all -1, no label,
is left out), and an ``Image`` column (decoded or stored as bytes) makes it image data,
written as PIL images in a list are. The same rows therefore get the same ids and
fingerprint as in a DataFrame or a table on disk. The Hugging Face readers and the cache
writers live in ``zmdevice.cached_inputs``, in the ground layer, where ``data.open_dataset``
(and so every command) reaches them.

pandas and datasets stay optional: their objects are recognised by name, and ``datasets``
is imported only to read a saved folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from zmdevice.cached_inputs import (
    hf_image_column,
    image_id,
    input_cache,
    is_hf_dataset,
    is_pil,
    table_rows,
    write_hf_dataset,
    write_images,
    write_table,
)
from zmdevice.errors import UserError, write_text_atomic

__all__ = [  # re-exported: the API's readers of in-memory data use them from here
    "hf_image_column",
    "image_id",
    "input_cache",
    "is_hf_dataset",
    "is_pil",
]


def data_path(data: Any, role: str, options=None) -> Path:
    """A file or folder the stage functions can open for ``data``.

    Args:
        data: a path (returned as it is), a pandas DataFrame, a ``datasets.Dataset``, or a
            list of texts, image paths, PIL images, or ``(item, label)`` pairs of those.
        role: what the data is for (``data``, ``labeled``, ...), named in errors.
        options: the ``DataOptions`` the stage will read the file with (column names).

    Raises:
        UserError: an empty list, mixed kinds of items, or an unsupported type.
    """
    from zmdevice.config import DataOptions

    options = options or DataOptions()
    if isinstance(data, (str, os.PathLike)):
        return Path(data)
    if is_dataframe(data):
        return write_table(_frame_rows(data, options), "table")
    if is_hf_dataset(data):
        return write_hf_dataset(data, role, options)
    if type(data).__name__ in ("DatasetDict", "IterableDataset", "IterableDatasetDict"):
        raise UserError(
            f"{role}: a {type(data).__name__} is not one data set: pass a datasets.Dataset "
            "(one split, e.g. data['train'])"
        )
    if isinstance(data, (list, tuple)):
        return _write_items(list(data), role, options)
    raise UserError(
        f"{role}: expected a path, a pandas DataFrame, a datasets.Dataset, or a list of "
        f"texts, images or (item, label) pairs; got {type(data).__name__}"
    )


def is_dataframe(data: Any) -> bool:
    # Checked by name so that pandas stays optional and is never imported here.
    return type(data).__name__ == "DataFrame" and hasattr(data, "to_dict")


def _frame_rows(frame, options) -> list[dict]:
    """The rows of a DataFrame; image paths made absolute, their ids kept as written."""
    rows = [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]
    return table_rows(rows, {str(name) for name in frame.columns}, options)


def _split_labels(items: list, role: str) -> tuple[list, list[str] | None]:
    """``(item, label)`` pairs -> items and labels; plain items -> items and None."""
    pairs = [isinstance(item, tuple) and len(item) == 2 for item in items]
    if not any(pairs):
        return items, None
    if not all(pairs):
        raise UserError(f"{role}: mix of (item, label) pairs and plain items; use one kind")
    return [item for item, _ in items], [str(label) for _, label in items]


def _item_kind(items: list, role: str) -> str:
    """``text``, ``image`` (PIL images) or ``path`` (image files) for a list of items."""
    from zmdevice.images import IMAGE_EXTENSIONS

    def kind(item) -> str:
        if is_pil(item):
            return "image"
        if isinstance(item, os.PathLike):
            return "path"
        if isinstance(item, str):
            return "text"
        raise UserError(
            f"{role}: items must be texts, PIL images or image paths, got {type(item).__name__}"
        )

    kinds = {kind(item) for item in items}
    if len(kinds) > 1:
        raise UserError(f"{role}: mix of {' and '.join(sorted(kinds))} items; use one kind")
    found = kinds.pop()
    if found == "text" and all(
        item.lower().endswith(IMAGE_EXTENSIONS) and Path(item).is_file() for item in items
    ):
        return "path"  # strings that all name image files are image paths
    return found


def _write_items(items: list, role: str, options) -> Path:
    if not items:
        raise UserError(f"{role} is empty: give at least one item")
    items, labels = _split_labels(items, role)
    kind = _item_kind(items, role)
    if kind == "text":
        rows = [{options.text_column: text} for text in items]
        name = "texts"
    elif kind == "path":
        paths = [Path(item).resolve() for item in items]
        root = Path(os.path.commonpath([path.parent for path in paths]))
        rows = [
            {options.path_column: str(path), options.id_column: path.relative_to(root).as_posix()}
            for path in paths
        ]
        name = "images"
    else:
        return write_images(items, labels, options)
    if labels is not None:
        for row, label in zip(rows, labels, strict=True):
            row[options.label_column] = label
    return write_table(rows, name)


def class_spec(classes: Any) -> str:
    """What ``--classes`` takes, for a spec string, a list of names or a name -> prompts dict.

    A list of plain names becomes a comma list; names with commas, and dicts of prompts,
    go to a JSON file in the input cache.
    """
    if isinstance(classes, (str, os.PathLike)):
        return str(classes)
    if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes):
        if all(name == name.strip() and name and "," not in name for name in classes):
            return ",".join(classes)
        content = json.dumps(list(classes), ensure_ascii=False)
    elif isinstance(classes, dict):
        content = json.dumps(classes, ensure_ascii=False)
    else:
        raise UserError(
            f"classes: expected a list of names, a dict of name -> prompt(s), or what "
            f"--classes takes; got {type(classes).__name__}"
        )
    path = input_cache() / f"classes-{hashlib.sha256(content.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        write_text_atomic(path, content)
    return str(path)
