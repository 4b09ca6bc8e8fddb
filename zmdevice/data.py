"""Readers for the data sets zmdevice works on: text tables, image folders, image tables.

Formats (see docs/design.md):

- **Text table**: CSV, JSONL or Parquet with a text column (``text``), an optional id column
  (``id``) and an optional label column (``label``, class names). Column names come from
  :class:`~zmdevice.config.DataOptions`.
- **Image folder**: image files searched recursively; the id is the path relative to the
  folder in POSIX form (``shirt/0001.png``). A folder whose images all sit inside
  sub-folders is labeled: the label is the first path component (one sub-folder per class).
  Files that are not images (README, CSV, ...) and hidden entries are ignored.
- **Image table**: CSV, JSONL or Parquet with a ``path`` column (relative to the table's
  folder, or absolute), optional ``id`` (default: the path as written) and ``label``. A
  table is read as images when it has the path column and no text column, or when the
  caller asks for ``modality="image"``.

- **Saved Hugging Face dataset**: a folder written by ``datasets.Dataset.save_to_disk``
  reads as the table (or the images) it holds, named by the folder (``zmdevice.cached_inputs``).

Empty text, id or label cells are errors (naming the row), not silently skipped rows.

Ids are stable: given by the data, or derived from content (``t`` + 16 hex digits of the
text's SHA-1; the n-th repeat of the same text gets ``~n``), never from the row position, so
reordering rows keeps every id. Pseudo-labels are joined to data by these ids.

Images stream from disk: an :class:`ImageDataset` holds only its relative paths; each image
is opened in :meth:`ImageDataset.load_image` and converted to RGB there.

Unreadable images: by default :meth:`ImageDataset.load_image` raises :class:`UserError`
naming the file. With ``DataOptions(skip_corrupt=True)`` it raises :class:`CorruptImage`
instead, which loaders catch and count; :func:`iter_images` shows the pattern::

    skipped: list[str] = []
    for index, image in iter_images(dataset, range(len(dataset)), skipped):
        ...
    print(f"skipped {len(skipped)} unreadable images")

Decoding one image file is ``zmdevice.images``, reading a table file into columns and
checking its cells ``zmdevice.tables``, class lists ``zmdevice.classes``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, overload

from zmdevice.cached_inputs import saved_dataset_table
from zmdevice.classes import ClassList
from zmdevice.config import DataOptions
from zmdevice.errors import FlagHint, UserError, listing
from zmdevice.images import (
    IMAGE_EXTENSIONS,
    CorruptImage,
    UnreadableImage,
    open_image,
    scan_images,
    to_rgb,
)
from zmdevice.label_studio_export import read_label_studio_export, row_content
from zmdevice.tables import (
    TABLE_SUFFIXES,
    column,
    filled,
    label_cells,
    read_table,
    required_column,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# --------------------------------------------------------------------------- datasets


@dataclass
class TextDataset:
    """A text table in memory: ``ids[i]``, ``texts[i]`` and optionally ``labels[i]``."""

    source: Path
    """The table it was read from."""
    ids: list[str]
    """Unique sample ids (given or derived from the text)."""
    texts: list[str]
    """The texts, one per sample."""
    labels: list[str] | None = None
    """Class names, or None for unlabeled data."""
    modality: str = field(default="text", init=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the ids and texts, in order (labels excluded)."""
        digest = hashlib.sha256()
        for sample_id, text in zip(self.ids, self.texts, strict=True):
            digest.update(sample_id.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return f"row {index + 1} (id '{self.ids[index]}') of {self.source}"


class _JoinedPaths(Sequence[Path]):
    """``root / relative[i]`` computed on access, so a million paths cost only their strings."""

    def __init__(self, root: Path, relative: list[str]):
        self._root = root
        self._relative = relative

    def __len__(self) -> int:
        return len(self._relative)

    @overload
    def __getitem__(self, index: int) -> Path: ...
    @overload
    def __getitem__(self, index: slice) -> list[Path]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._root / rel for rel in self._relative[index]]
        return self._root / self._relative[index]


@dataclass
class ImageDataset:
    """Images on disk, opened lazily one at a time by :meth:`load_image`."""

    source: Path
    """The folder or image table it was read from."""
    ids: list[str]
    """Unique sample ids (relative path, or the table's id column)."""
    root: Path
    """Folder the relative paths are relative to."""
    relative_paths: list[str]
    """Image paths relative to ``root`` (or absolute), one per sample."""
    labels: list[str] | None = None
    """Class names, or None for unlabeled data."""
    options: DataOptions = field(default_factory=DataOptions)
    """Corrupt-image policy (``skip_corrupt``)."""
    modality: str = field(default="image", init=False)

    @property
    def paths(self) -> Sequence[Path]:
        """Full image paths, computed on access (indexable like a list)."""
        return _JoinedPaths(self.root, self.relative_paths)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        """Open image ``index`` and return it in RGB.

        Grey, palette, CMYK and 16-bit images are converted; transparent images (RGBA, LA,
        palette with transparency) are composited on white, so a transparent background
        does not turn black.

        Raises:
            UserError: the file cannot be read (names the file, mentions --skip-corrupt).
            CorruptImage: the same, when ``options.skip_corrupt`` is set.
        """
        path = self.root / self.relative_paths[index]
        try:
            return to_rgb(open_image(path))
        except UnreadableImage as error:
            if self.options.skip_corrupt:
                raise CorruptImage(error.message) from None
            raise UserError(
                f"unreadable image {path} (id '{self.ids[index]}'): {error.reason}",
                hint=FlagHint(
                    "--skip-corrupt",
                    "fix or delete it, or pass --skip-corrupt to skip and count unreadable images",
                    "fix or delete it",
                ),
            ) from None

    def __getitem__(self, index: int) -> Image.Image:
        return self.load_image(index)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the ids and file sizes (cheap: no image is decoded)."""
        digest = hashlib.sha256()
        for sample_id, rel in zip(self.ids, self.relative_paths, strict=True):
            try:
                size = os.stat(self.root / rel).st_size
            except OSError:
                size = -1
            digest.update(f"{sample_id}\0{size}\0".encode())
        return digest.hexdigest()

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return f"image '{self.ids[index]}' of {self.source}"


def iter_images(
    dataset: ImageDataset, indices: Iterable[int], skipped: list[str] | None = None
) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(index, RGB image)``; unreadable images are skipped when allowed.

    With ``dataset.options.skip_corrupt`` an unreadable image is left out and its id is
    appended to ``skipped`` (when given); otherwise the first one raises ``UserError``.
    """
    for index in indices:
        try:
            image = dataset.load_image(index)
        except CorruptImage:
            if skipped is not None:
                skipped.append(dataset.ids[index])
            continue
        yield index, image


# --------------------------------------------------------------------------- opening


def open_dataset(
    path: str | os.PathLike,
    options: DataOptions | None = None,
    *,
    modality: str | None = None,
    require_labels: bool = False,
) -> TextDataset | ImageDataset:
    """Open a data set from disk.

    Args:
        path: a folder (images, or a ``datasets.Dataset.save_to_disk`` folder: text or
            images, see ``zmdevice.inputs``), or a ``.csv``/``.jsonl``/``.parquet`` table
            (text, or images when it has the path column and no text column).
        options: column names and corrupt-image policy.
        modality: "text" or "image" to insist on one kind; None decides from the data.
        require_labels: fail unless every sample has a label.

    Returns:
        A TextDataset or ImageDataset with unique ids.

    Raises:
        UserError: missing file/column, empty data, duplicate ids, unsupported file type,
            missing labels when required, image table rows whose file is missing.
    """
    options = options or DataOptions()
    if modality not in (None, "text", "image"):
        raise ValueError(f"modality must be 'text', 'image' or None, got {modality!r}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"data not found: {path} does not exist; check the path")
    if path.is_dir():
        saved = saved_dataset_table(path, options)
        if saved is not None:
            return _saved_dataset(path, read_table(saved), options, modality, require_labels)
        if modality == "text":
            raise UserError(
                f"{path} is a folder, but text data must be a CSV, JSONL or Parquet table"
            )
        return _open_image_folder(path, options, require_labels)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _label_studio_export(path, options, modality)
    if suffix not in TABLE_SUFFIXES:
        hint = " (a single image is not a data set: give its folder)" if _is_image(path) else ""
        raise UserError(
            f"unsupported file type '{path.suffix}' for {path}{hint}: use a .csv, .jsonl or "
            ".parquet table, a Label Studio .json export, or a folder of images"
        )
    columns = read_table(path)
    is_image_table = modality == "image" or (
        modality is None and options.path_column in columns and options.text_column not in columns
    )
    if is_image_table:
        return _image_table(path, columns, options, require_labels)
    return _text_table(path, columns, options, require_labels)


def _saved_dataset(
    folder: Path,
    columns: dict[str, list],
    options: DataOptions,
    modality: str | None,
    require_labels: bool,
) -> TextDataset | ImageDataset:
    """A ``Dataset.save_to_disk`` folder, from the table ``saved_dataset_table`` made
    of it (absolute image paths), read as that table is but named by the folder."""
    is_images = options.path_column in columns and options.text_column not in columns
    if is_images and modality == "text":
        raise UserError(
            f"{folder} is a saved datasets.Dataset of images, but text data is needed here: "
            f"give one with a '{options.text_column}' column"
        )
    if is_images or modality == "image":
        return _image_table(folder, columns, options, require_labels)
    return _text_table(folder, columns, options, require_labels)


def _label_studio_export(
    path: Path, options: DataOptions, modality: str | None
) -> TextDataset | ImageDataset:
    """A Label Studio JSON export, read as the labeled table of its annotated tasks (image
    paths relative to the export's folder); a task without a zmdevice id gets the id its
    text or path would get in a table."""
    rows = read_label_studio_export(path)
    content = row_content(
        rows,
        f"{path} has no annotated task: label some tasks in Label Studio first",
        f"{path} mixes text and image tasks; keep one kind per project",
    )
    held = "text" if content == "text" else "image"
    if modality not in (None, held):
        raise UserError(f"{path} holds {held}s, not {modality}s")
    make_id = content_id if content == "text" else str
    names = {"text": options.text_column, "path": options.path_column}
    columns = {
        options.id_column: [row["id"] or make_id(row[content]) for row in rows],
        names[content]: [row[content] for row in rows],
        options.label_column: [row["label"] for row in rows],
    }
    if content == "text":
        return _text_table(path, columns, options, require_labels=True)
    return _image_table(path, columns, options, require_labels=True)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _check_unique(ids: list[str], source: Path, what: str = "row") -> None:
    first_seen: dict[str, int] = {}
    for index, sample_id in enumerate(ids):
        if sample_id in first_seen:
            raise UserError(
                f"duplicate id '{sample_id}' in {source}: {what}s {first_seen[sample_id] + 1} "
                f"and {index + 1}; ids must be unique"
            )
        first_seen[sample_id] = index


def content_id(text: str) -> str:
    """The id derived from a text: 't' + the first 16 hex digits of its SHA-1."""
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _text_table(
    path: Path, columns: dict[str, list], options: DataOptions, require_labels: bool
) -> TextDataset:
    raw_texts = required_column(path, columns, "text_column", options)
    problem = f"has no text in column '{options.text_column}'; fill it in or remove the row"
    texts = [text for _, text in filled(path, raw_texts, problem)]
    if options.id_column in columns:
        problem = (
            f"has no id in column '{options.id_column}'; "
            "fill it in, or drop the column to derive ids from the texts"
        )
        cells = column(path, columns, "id_column", options)
        ids = [sample_id.strip() for _, sample_id in filled(path, cells, problem)]
    else:
        # Repeats of the same text get ~2, ~3... in order: identical texts are
        # interchangeable, so this is still independent of where the rows sit.
        seen: dict[str, int] = {}
        ids = []
        for text in texts:
            base = content_id(text)
            seen[base] = seen.get(base, 0) + 1
            ids.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    _check_unique(ids, path)
    return TextDataset(
        source=path,
        ids=ids,
        texts=texts,
        labels=label_cells(path, columns, options, require_labels),
    )


def _image_table(
    path: Path, columns: dict[str, list], options: DataOptions, require_labels: bool
) -> ImageDataset:
    raw_paths = required_column(path, columns, "path_column", options)
    root = path.parent
    relative = []
    for row, rel in filled(path, raw_paths, f"has an empty '{options.path_column}'"):
        rel = rel.strip()
        if not (root / rel).is_file():
            raise UserError(
                f"row {row + 1} of {path}: image file '{rel}' not found (looked for "
                f"{root / rel}); paths are relative to the table's folder"
            )
        relative.append(rel)
    if options.id_column in columns:
        cells = column(path, columns, "id_column", options)
        problem = f"has no id in '{options.id_column}'"
        ids = [sample_id.strip() for _, sample_id in filled(path, cells, problem)]
    else:
        ids = list(relative)
    _check_unique(ids, path)
    return ImageDataset(
        source=path,
        ids=ids,
        root=root,
        relative_paths=relative,
        labels=label_cells(path, columns, options, require_labels),
        options=options,
    )


def _open_image_folder(folder: Path, options: DataOptions, require_labels: bool) -> ImageDataset:
    relative = scan_images(folder)
    if not relative:
        raise UserError(
            f"empty data set: no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}"
        )
    in_subfolders = ["/" in rel for rel in relative]
    labels = None
    if all(in_subfolders):
        labels = [rel.split("/", 1)[0] for rel in relative]
    elif require_labels:
        if not any(in_subfolders):
            raise UserError(
                f"labeled image folder {folder} has no class sub-folders: put each class's "
                "images in a sub-folder named after the class"
            )
        loose = relative[in_subfolders.index(False)]
        raise UserError(
            f"labeled image folder {folder} has image '{loose}' outside the class sub-folders; "
            "move it into the sub-folder of its class"
        )
    return ImageDataset(
        source=folder,
        ids=list(relative),
        root=folder,
        relative_paths=relative,
        labels=labels,
        options=options,
    )


def label_indices(
    dataset: TextDataset | ImageDataset, classes: ClassList | Sequence[str], *, owner: str = ""
) -> np.ndarray:
    """Class index of every sample's label.

    Args:
        dataset: a labeled data set.
        classes: the classes (a ``ClassList`` or the names), index = class id.
        owner: whose classes they are, for the error ("the model", "the student DIR").

    Returns:
        int64 array [N].

    Raises:
        UserError: the data set has no labels, or a label is not one of the classes (the
            first such sample named, the other unknown labels counted).
    """
    import numpy as np

    names = list(classes.names if isinstance(classes, ClassList) else classes)
    if dataset.labels is None:
        kind = "a label column" if dataset.modality == "text" else "class sub-folders"
        raise UserError(f"{dataset.source} has no labels: labeled data needs {kind}")
    lookup = {name: i for i, name in enumerate(names)}
    unknown = [i for i, label in enumerate(dataset.labels) if label not in lookup]
    if unknown:
        first = dataset.labels[unknown[0]]
        others = sorted({dataset.labels[i] for i in unknown} - {first})
        more = f" (other unknown labels: {listing(others, 5)})" if others else ""
        whose = f" of {owner}" if owner else ""
        raise UserError(
            f"unknown label '{first}' at {dataset.describe(unknown[0])}{more}; "
            f"the classes{whose} are: {listing(names)}"
        )
    return np.asarray([lookup[label] for label in dataset.labels], dtype=np.int64)
