"""Table files (CSV, JSONL, Parquet) read into named columns of cells, and the cell checks
every table reader shares: a column that must exist and hold plain values, cells that must
be filled (the error names the row), labels. ``zmdevice.data`` builds its data sets on
these; nothing here knows about texts or images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from zmdevice.errors import FlagHint, UserError, listing

if TYPE_CHECKING:
    from zmdevice.config import DataOptions

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
FLAGS = {
    "text_column": "--text-column",
    "id_column": "--id-column",
    "label_column": "--label-column",
    "path_column": "--path-column",
}


def read_table(path: Path) -> dict[str, list]:
    """Read a table into column name -> list of values (str, numbers or None)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except (pa.ArrowInvalid, OSError) as error:
                raise UserError(f"cannot read Parquet file {path}: {error}") from None
            return {name: table.column(name).to_pylist() for name in table.column_names}
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return _read_csv(path, handle) if suffix == ".csv" else _read_jsonl(path, handle)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None


def _read_csv(path: Path, handle) -> dict[str, list]:
    # The csv module's default 128 KiB field limit is too small for long documents.
    csv.field_size_limit(2**31 - 1)
    # strict: an unbalanced quote would otherwise swallow the rest of the file silently.
    reader = csv.reader(handle, strict=True)
    try:
        return _read_csv_rows(path, reader)
    except csv.Error as error:
        raise UserError(f"line {reader.line_num} of {path} is not valid CSV: {error}") from None


def _read_csv_rows(path: Path, reader) -> dict[str, list]:
    header = next(reader, None)
    if header is None:
        raise UserError(f"empty data set: {path} has no header row and no rows")
    header = [name.strip() for name in header]
    columns: dict[str, list] = {name: [] for name in header}
    if len(columns) != len(header):
        raise UserError(f"{path} has a repeated column name in its header: {', '.join(header)}")
    for row in reader:
        if not row:
            continue  # blank line
        if len(row) > len(header):
            raise UserError(
                f"line {reader.line_num} of {path} has {len(row)} fields but the header has "
                f"{len(header)}; quote texts that contain commas"
            )
        for i, name in enumerate(header):
            columns[name].append(row[i] if i < len(row) else None)
    return columns


def _read_jsonl(path: Path, handle) -> dict[str, list]:
    records = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"line {line_number} of {path} is not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise UserError(f"line {line_number} of {path} is not a JSON object")
        records.append(record)
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def column(path: Path, columns: dict[str, list], option: str, options: DataOptions) -> list:
    """The cells of the column ``options.<option>`` names; UserError if absent or nested."""
    name = getattr(options, option)
    if name not in columns:
        present = listing(columns) or "(none)"
        raise UserError(
            f"{path} has no column '{name}' (columns: {present})",
            hint=FlagHint(
                FLAGS[option],
                f"name the right one with {FLAGS[option]}",
                f"rename the right one to '{name}'",
            ),
        )
    cells = columns[name]
    for row, value in enumerate(cells):
        kind = _NESTED_TYPES.get(type(value))
        if kind:
            raise UserError(
                f"column '{name}' of {path} holds {kind} values (row {row + 1}), not plain "
                "values: store one string (or number) per cell"
            )
    return cells


# Cell types read from JSON or Parquet that would only turn into their repr() as text.
_NESTED_TYPES = {list: "list", tuple: "list", dict: "struct/object", bytes: "binary"}


def as_text(value) -> str | None:
    """A cell as a string; None for missing cells (None, NaN, empty string)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # label 3.0 from a float column means class "3"
    text = str(value)
    return text if text.strip() else None


def label_cells(
    path: Path, columns: dict[str, list], options: DataOptions, require: bool
) -> list[str] | None:
    if options.label_column not in columns:
        if require:
            column(path, columns, "label_column", options)  # raises the missing-column error
        return None
    problem = f"has no label in column '{options.label_column}'; fill it in or remove the row"
    cells = filled(path, column(path, columns, "label_column", options), problem)
    return [label.strip() for _, label in cells]


def filled(path: Path, cells: list, problem: str) -> Iterator[tuple[int, str]]:
    """(row, text) of each cell in order; a missing cell (``_as_text`` None) raises
    UserError "row N of PATH {problem}" when it is reached."""
    for row, value in enumerate(cells):
        text = as_text(value)
        if text is None:
            raise UserError(f"row {row + 1} of {path} {problem}")
        yield row, text


def required_column(
    path: Path, columns: dict[str, list], option: str, options: DataOptions
) -> list:
    """The cells of the column every row of a table must fill; UserError when it has none."""
    cells = column(path, columns, option, options)
    if not cells:
        raise UserError(f"empty data set: {path} has no rows")
    return cells
