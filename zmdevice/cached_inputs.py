"""In-memory data written once as the files ``data.open_dataset`` reads: a Hugging Face
``datasets.Dataset`` (the API's object, or a ``save_to_disk`` folder), rows of a DataFrame
or list, and PIL images, each to the input cache under a content-derived name, so the same
rows give the same ids and fingerprint however they arrive (``zmdevice.inputs`` describes
the rules). ``datasets`` is imported only once a folder looks like a saved dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from zmdevice.errors import UserError, atomic_path, write_text_atomic

# A ``datasets.Dataset`` (the API's object, or a ``save_to_disk`` folder read by
# ``open_dataset``) becomes the table, or the images plus image table, that the same rows
# make as a DataFrame or a list of PIL images: written once to the input cache, named by
# content, so both get the same ids and fingerprint (``zmdevice.inputs`` describes the rules).


def input_cache() -> Path:
    """Where in-memory data is written for the stages to read (``zmdevice.inputs``'s
    docstring describes it): ``$ZMDEVICE_CACHE/inputs``, else the XDG cache folder."""
    override = os.environ.get("ZMDEVICE_CACHE")
    if override:
        return Path(override) / "inputs"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zmdevice" / "inputs"


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


def write_hf_dataset(dataset, role: str, options) -> Path:
    """A ``datasets.Dataset`` as the table (text) or the images + table (image) it holds."""
    if len(dataset) == 0:
        raise UserError(f"{role}: the datasets.Dataset is empty: give at least one row")
    image_column = hf_image_column(dataset)
    if image_column is None:
        columns = _hf_columns(dataset, set(), role)
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(dataset))]
        # The file the same rows in a DataFrame make (image paths as a DataFrame's, too).
        return write_table(table_rows(rows, set(columns), options), "table")
    images = _hf_images(dataset, image_column, role)
    columns = _hf_columns(dataset, {image_column}, role)
    labels, ids = columns.get(options.label_column), columns.get(options.id_column)
    labels = None if labels is None else [str(label) for label in labels]
    ids = None if ids is None else [str(sample_id) for sample_id in ids]
    return write_images(images, labels, options, ids=ids)


def _hf_images(dataset, image_column: str, role: str) -> list:
    """The PIL images of a ``Dataset``'s ``Image`` column, whether it decodes or not: its
    stored ``{"bytes", "path"}`` values are decoded here one by one, so an error names the
    row."""
    feature = dataset.features[image_column]
    raw = dataset.cast_column(image_column, type(feature)(decode=False))
    values = list(raw[image_column])
    decoder = type(feature)()  # the same feature, decoding
    images = []
    for row, value in enumerate(values):
        try:
            images.append(decoder.decode_example(value))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
            reason = " ".join(str(error).split())[:120] or type(error).__name__
            raise UserError(
                f"{role}: row {row + 1} of the image column '{image_column}' is not a readable "
                f"image ({reason}); fix or remove that row (dataset.filter)"
            ) from None
    return images


def saved_dataset_table(folder: Path, options) -> Path | None:
    """The table (and images) of a folder written by ``Dataset.save_to_disk``, written to the
    input cache; None when ``folder`` is not such a folder.

    Raises:
        UserError: the folder holds a ``DatasetDict`` (splits), or datasets is missing.
    """
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text("utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(path.name for path in folder.iterdir() if path.is_dir())
        example = folder / (splits[0] if splits else "train")
        raise UserError(
            f"{folder} holds a DatasetDict with the splits {', '.join(map(str, splits))}: "
            f"give one split's folder, e.g. {example}"
        )
    marks = [name for name in _SAVED_FILES if (folder / name).is_file()]
    arrow = next(folder.glob("*.arrow"), None)
    if not marks and arrow is None:
        return None  # an image folder (or anything else the caller reads)
    if len(marks) < len(_SAVED_FILES):
        missing = sorted(set(_SAVED_FILES) - set(marks))
        raise UserError(
            f"{folder} is not a complete saved datasets.Dataset (no {', '.join(missing)}): "
            "save it again with Dataset.save_to_disk, or give a table or an image folder"
        )
    try:
        import datasets
    except ModuleNotFoundError:
        raise UserError(
            f"{folder} is a saved datasets.Dataset; reading it needs the Python package "
            "'datasets', which is not installed: pip install 'zmdevice[datasets]'"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets, pyarrow and json each raise their own kinds
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(
            f"cannot read the saved datasets.Dataset {folder} ({reason}): save it again with "
            "Dataset.save_to_disk"
        ) from None
    if not is_hf_dataset(dataset):
        raise UserError(
            f"{folder} holds a {type(dataset).__name__}, not one datasets.Dataset: give one "
            "split's folder"
        )
    return write_hf_dataset(dataset, str(folder), options)


# What Dataset.save_to_disk writes beside its .arrow files.
_SAVED_FILES = ("dataset_info.json", "state.json")


def table_rows(rows: list[dict], columns: set[str], options) -> list[dict]:
    """``rows`` of an image table (a path column, no text column) with absolute paths."""
    if options.path_column in columns and options.text_column not in columns:
        for row in rows:
            written = row[options.path_column]
            if isinstance(written, (str, os.PathLike)):
                row.setdefault(options.id_column, str(written))
                row[options.path_column] = str(Path(written).resolve())
    return rows


def is_pil(item: Any) -> bool:
    return hasattr(item, "getbands") and hasattr(item, "tobytes")


def write_table(rows: list[dict], kind: str) -> Path:
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


def write_images(images: list, labels: list | None, options, ids: list | None = None) -> Path:
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
    return write_table(rows, "images")
