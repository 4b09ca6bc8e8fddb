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
its ``save_to_disk`` wherever a data path is (``open_dataset`` reads it through
``saved_dataset_table``): its ``text``, ``label`` and ``id`` columns are a table's, a
``ClassLabel`` column gives its class names (one that is all -1, no label, is left out),
and an ``Image`` column (PIL images) makes it image data, written as PIL images in a list
are. The same rows therefore get the same ids and fingerprint as in a DataFrame or a table
on disk.

Only the standard library: pandas and datasets stay optional (their objects are recognised
by name; ``datasets`` is imported only to read a saved folder).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from zmdevice.errors import UserError, atomic_path, write_text_atomic


def input_cache() -> Path:
    """Where in-memory data is written for the stages to read (see the module docstring)."""
    override = os.environ.get("ZMDEVICE_CACHE")
    if override:
        return Path(override) / "inputs"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zmdevice" / "inputs"


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
        return _write_table(_frame_rows(data, options), "table")
    if is_hf_dataset(data):
        return _write_hf_dataset(data, role, options)
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


def is_hf_dataset(data: Any) -> bool:
    """A Hugging Face ``datasets.Dataset`` (recognised by name: datasets stays optional)."""
    kind = type(data)
    return kind.__name__ == "Dataset" and kind.__module__.split(".")[0] == "datasets"


def hf_image_column(dataset) -> str | None:
    """The name of a ``Dataset``'s first ``Image`` column, or None."""
    features = getattr(dataset, "features", None) or {}
    return next((name for name, kind in features.items() if type(kind).__name__ == "Image"), None)


def _hf_columns(dataset, skip: set[str], role: str) -> dict[str, list]:
    """Column name -> values of a ``Dataset``, ``ClassLabel`` integers as their names (a
    ``ClassLabel`` column that is all -1, no label, left out)."""
    columns = {}
    for name, feature in dataset.features.items():
        if name in skip:
            continue
        values = list(dataset[name])
        if type(feature).__name__ == "ClassLabel":
            missing = sum(1 for v in values if v is None or v < 0)  # -1: "no label"
            if missing == len(values):
                continue  # an unlabeled split (a test split's labels hidden): no labels
            if missing:
                raise UserError(
                    f"{role}: {missing} of {len(values)} rows have no label (-1) in the "
                    f"ClassLabel column '{name}': filter them out (dataset.filter(lambda row: "
                    f"row[{name!r}] >= 0)) or drop the column (remove_columns) for unlabeled data"
                )
            values = [feature.int2str(int(v)) for v in values]
        columns[str(name)] = values
    return columns


def _write_hf_dataset(dataset, role: str, options) -> Path:
    """A ``datasets.Dataset`` as the table (text) or the images + table (image) it holds."""
    if len(dataset) == 0:
        raise UserError(f"{role}: the datasets.Dataset is empty: give at least one row")
    image_column = hf_image_column(dataset)
    if image_column is None:
        columns = _hf_columns(dataset, set(), role)
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(dataset))]
        # The file the same rows in a DataFrame make (image paths as a DataFrame's, too).
        return _write_table(_table_rows(rows, set(columns), options), "table")
    images = list(dataset[image_column])
    bad = next((image for image in images if not is_pil(image)), None)
    if bad is not None:
        raise UserError(
            f"{role}: the datasets.Dataset's image column '{image_column}' holds "
            f"{type(bad).__name__} values, not images (leave the Image feature decoding)"
        )
    columns = _hf_columns(dataset, {image_column}, role)
    labels, ids = columns.get(options.label_column), columns.get(options.id_column)
    labels = None if labels is None else [str(label) for label in labels]
    ids = None if ids is None else [str(sample_id) for sample_id in ids]
    return _write_images(images, labels, options, ids=ids)


def saved_dataset_table(folder: Path, options) -> Path | None:
    """The table (and images) of a folder written by ``Dataset.save_to_disk``, written to the
    input cache; None when ``folder`` is not such a folder.

    Raises:
        UserError: the folder holds a ``DatasetDict`` (splits), or datasets is missing.
    """
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(path.name for path in folder.iterdir() if path.is_dir())
        raise UserError(
            f"{folder} holds the splits of a DatasetDict ({', '.join(splits)}): give one "
            f"split's folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if not ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()):
        return None
    try:
        import datasets
    except ModuleNotFoundError:
        raise UserError(
            f"{folder} is a saved datasets.Dataset; reading it needs the Python package "
            "'datasets', which is not installed: pip install 'zmdevice[datasets]'"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"cannot read the saved datasets.Dataset {folder}: {reason}") from None
    return _write_hf_dataset(dataset, str(folder), options)


def _frame_rows(frame, options) -> list[dict]:
    """The rows of a DataFrame; image paths made absolute, their ids kept as written."""
    rows = [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]
    return _table_rows(rows, {str(name) for name in frame.columns}, options)


def _table_rows(rows: list[dict], columns: set[str], options) -> list[dict]:
    """``rows`` of an image table (a path column, no text column) with absolute paths."""
    if options.path_column in columns and options.text_column not in columns:
        for row in rows:
            written = row[options.path_column]
            if isinstance(written, (str, os.PathLike)):
                row.setdefault(options.id_column, str(written))
                row[options.path_column] = str(Path(written).resolve())
    return rows


def _split_labels(items: list, role: str) -> tuple[list, list[str] | None]:
    """``(item, label)`` pairs -> items and labels; plain items -> items and None."""
    pairs = [isinstance(item, tuple) and len(item) == 2 for item in items]
    if not any(pairs):
        return items, None
    if not all(pairs):
        raise UserError(f"{role}: mix of (item, label) pairs and plain items; use one kind")
    return [item for item, _ in items], [str(label) for _, label in items]


def is_pil(item: Any) -> bool:
    return hasattr(item, "getbands") and hasattr(item, "tobytes")


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
        return _write_images(items, labels, options)
    if labels is not None:
        for row, label in zip(rows, labels, strict=True):
            row[options.label_column] = label
    return _write_table(rows, name)


def _write_table(rows: list[dict], kind: str) -> Path:
    """``rows`` as a JSONL table in the input cache, named after its kind and content
    (``texts-<16 hex>.jsonl``: also the data name in default label file names)."""
    if not rows:
        raise UserError("an in-memory table is empty: give at least one row")
    # JSONL keeps every string exactly (a CSV round trip may not) and any mix of types.
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = input_cache() / f"{kind}-{digest}.jsonl"
    if not path.is_file():
        write_text_atomic(path, text)
    return path


def image_id(image) -> str:
    """The content-derived id of a PIL image: ``i`` + 16 hex of the SHA-1 of its pixels."""
    digest = hashlib.sha1(f"{image.mode} {image.size}\0".encode())
    digest.update(image.tobytes())
    return f"i{digest.hexdigest()[:16]}.png"


def _write_images(images: list, labels: list | None, options, ids: list | None = None) -> Path:
    """PIL images saved as PNG files plus an image table (path, id, label) beside them.

    ``ids`` (a ``Dataset``'s id column) replace the content-derived ones."""
    folder = input_cache() / "images"
    rows, seen = [], {}
    for image in images:
        name = image_id(image)
        file = folder / name  # one file per distinct image, shared by every data set
        if not file.is_file():
            with atomic_path(file) as tmp:
                image.save(tmp, format="PNG")
        seen[name] = seen.get(name, 0) + 1  # repeats get ~2, ~3..., as repeated texts do
        sample_id = name if seen[name] == 1 else f"{name.removesuffix('.png')}~{seen[name]}.png"
        rows.append({options.path_column: str(file), options.id_column: sample_id})
    if ids is not None:
        for row, sample_id in zip(rows, ids, strict=True):
            row[options.id_column] = sample_id
    if labels is not None:
        for row, label in zip(rows, labels, strict=True):
            row[options.label_column] = label
    return _write_table(rows, "images")


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
