"""The pseudo-label file: a foundation model's zero-shot class probabilities, compact and id-keyed.

One Parquet file (zstd), one row per sample:

- ``id`` (string): the sample id of the data set (joined by id, never by position);
- ``label`` (int16/int32): the argmax class index;
- ``topk_idx`` (list of int16/int32): class indices, most probable first;
- ``topk_prob`` (list of float16): their probabilities.

Rows are ragged: each keeps the fewest top classes whose even-tail reconstruction stays
within ``max_kl`` nats of KL, in float16 (``zmdevice.topk`` says how and what it costs);
reading spreads the residual mass ``1 - sum(topk_prob)`` evenly over the classes a row does
not list (:meth:`PseudoLabels.dense_probs`). Writing buffers ``ROW_GROUP_ROWS`` per group.

File-level metadata is one JSON document under the Parquet key-value key
``zmdevice.pseudolabels``: format and zmdevice versions, class names and prompts, teacher
spec and preprocessing, templates, creation time, the data fingerprint, ``top_k``/``max_kl``
and, when the labeling run had gold labels, the quality report.

Ground floor: numpy and pyarrow only. The row encoding is ``zmdevice.topk``; joining the
part and shard files of one labeling run is ``zmdevice.labeling.join``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zmdevice import __version__
from zmdevice.errors import UserError, atomic_path, listing
from zmdevice.topk import (
    DEFAULT_MANTISSA_BITS,
    DEFAULT_MAX_KL,
    CompressedRows,
    compress_probs,
    dense_from_topk,
    rows_problem,
)

FORMAT = "zmdevice-pseudolabels"
FORMAT_VERSION = 1
METADATA_KEY = b"zmdevice.pseudolabels"
ROW_GROUP_ROWS = 8192
"""Rows buffered per Parquet row group: zstd compresses large groups much better."""


@dataclass
class PseudoLabels:
    """Pseudo-labels held in memory, aligned to ``ids``.

    Attributes:
        ids: N sample ids.
        label: int64 [N] argmax class index.
        topk_idx: int32 [N, K] class indices, most probable first; -1 pads short rows.
        topk_prob: float16 [N, K] their probabilities; 0 pads short rows.
        metadata: the file's metadata (classes, teacher, fingerprint, quality, ...).
    """

    ids: list[str]
    label: np.ndarray
    topk_idx: np.ndarray
    topk_prob: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.metadata["classes"])

    def __len__(self) -> int:
        return len(self.ids)

    def dense_probs(self) -> np.ndarray:
        """float32 [N, C] probabilities; unlisted classes share the residual mass evenly."""
        return dense_from_topk(self.topk_idx, self.topk_prob, len(self.classes))

    def select(self, ids: Iterable[str], allow_partial: bool = False) -> PseudoLabels:
        """The rows for ``ids``, in that order.

        Args:
            ids: sample ids of the data to join with.
            allow_partial: keep only the ids this file covers instead of failing.

        Raises:
            UserError: some ids have no pseudo-label (and not ``allow_partial``), or none do.
        """
        ids = list(ids)
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        rows = [position.get(sample_id, -1) for sample_id in ids]
        missing = [sample_id for sample_id, row in zip(ids, rows, strict=True) if row < 0]
        source = self.metadata.get("path", "the pseudo-label file")
        if missing and (not allow_partial or len(missing) == len(ids)):
            hint = (
                "relabel this data with `zmdevice label`"
                if allow_partial
                else f"relabel this data with `zmdevice label` or pass --allow-partial to use "
                f"the {len(ids) - len(missing)} it covers"
            )
            raise UserError(
                f"{source} lacks pseudo-labels for {len(missing)} of {len(ids)} ids "
                f"(e.g. {missing[0]!r}): {hint}"
            )
        keep = np.array([row for row in rows if row >= 0], dtype=np.int64)
        return PseudoLabels(
            ids=[self.ids[row] for row in keep],
            label=self.label[keep],
            topk_idx=self.topk_idx[keep],
            topk_prob=self.topk_prob[keep],
            metadata=self.metadata,
        )

    def check_fingerprint(self, fingerprint: str, allow_partial: bool = False) -> None:
        """Fail when the file was made from other data (another content fingerprint).

        ``allow_partial`` accepts it: ids are then trusted to name the same samples.
        """
        recorded = (self.metadata.get("data") or {}).get("fingerprint")
        if recorded and recorded != fingerprint and not allow_partial:
            source = self.metadata.get("path", "the pseudo-label file")
            raise UserError(
                f"{source} was made from other data (fingerprint {recorded[:12]} vs "
                f"{fingerprint[:12]}): relabel this data with `zmdevice label`, or pass "
                "--allow-partial to join by id anyway"
            )


def build_metadata(
    *,
    classes: list[str],
    teacher: dict,
    data: dict,
    top_k: int,
    max_kl: float = DEFAULT_MAX_KL,
    mantissa_bits: int = DEFAULT_MANTISSA_BITS,
    prompts: dict | None = None,
    templates: list[str] | None = None,
    created: str | None = None,
    **extra,
) -> dict:
    """The file's metadata document (see the module docstring); ``extra`` keys are kept."""
    import datetime

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zmdevice_version": __version__,
        "classes": list(classes),
        "prompts": prompts or {},
        "templates": templates,
        "teacher": teacher,
        "data": data,
        "top_k": int(top_k),
        "max_kl": float(max_kl),
        "mantissa_bits": int(mantissa_bits),
        "created": created or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quality": None,
        **extra,
    }


def _schema(num_classes: int, metadata: dict):
    import pyarrow as pa

    index_type = pa.int16() if num_classes <= np.iinfo(np.int16).max else pa.int32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("label", index_type),
            ("topk_idx", pa.list_(index_type)),
            ("topk_prob", pa.list_(pa.float16())),
        ],
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)},
    )


class PseudoLabelWriter:
    """Write a pseudo-label file row group by row group (memory: one group of rows).

    The file appears under its final name only on a clean :meth:`close` (atomic rename),
    so an interrupted run never leaves a truncated file. Use as a context manager::

        with PseudoLabelWriter(path, metadata) as writer:
            writer.write_probs(ids, probs)          # [B, C] probabilities
        # or writer.write_rows(ids, rows) with rows from compress_probs
    """

    def __init__(self, path: str | Path, metadata: dict):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.metadata = dict(metadata)
        self.num_classes = len(metadata["classes"])
        self.count = 0
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._schema = _schema(self.num_classes, self.metadata)
        self._writer = pq.ParquetWriter(
            self._tmp,
            self._schema,
            compression="zstd",
            compression_level=9,
            # Probabilities are near-unique values: a dictionary only costs space.
            use_dictionary=["id", "label", "topk_idx.list.element"],
            use_byte_stream_split=["topk_prob.list.element"],
            # The metadata JSON is in the key-value metadata already; the Arrow schema copy
            # and per-column statistics would only add footer bytes.
            store_schema=False,
            write_statistics=False,
        )
        self._closed = False
        self._buffer: list = []
        self._buffered = 0

    def write_probs(self, ids: list[str], probs: np.ndarray) -> None:
        """Append samples given as float [B, C] probabilities (compressed per the metadata)."""
        rows = compress_probs(
            probs,
            self.metadata["top_k"],
            self.metadata.get("max_kl", 0.0),
            self.metadata.get("mantissa_bits", 10),
        )
        self.write_rows(ids, rows)

    def write_rows(self, ids: list[str], rows: CompressedRows) -> None:
        """Append samples already in row encoding (one Parquet row group)."""
        import pyarrow as pa

        if len(ids) == 0:
            return
        index_type = self._schema.field("label").type
        offsets = np.concatenate([[0], np.cumsum(rows.counts)]).astype(np.int32)
        table = pa.table(
            {
                "id": pa.array([str(i) for i in ids], pa.string()),
                "label": pa.array(rows.label, index_type),
                "topk_idx": pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(rows.idx, index_type)
                ),
                "topk_prob": pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(rows.prob, pa.float16())
                ),
            },
            schema=self._schema,
        )
        self._append(table)

    def write_table(self, table) -> None:
        """Append an Arrow table read from another pseudo-label file of the same classes."""
        self._append(table.cast(self._schema))

    def _append(self, table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.count += table.num_rows
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer))
        self._buffer, self._buffered = [], 0

    def close(self, metadata_update: dict | None = None) -> Path:
        """Finish the file (optionally updating metadata, e.g. the quality report)."""
        if self._closed:
            return self.path
        self._flush()
        self.metadata.update(metadata_update or {})
        document = json.dumps(self.metadata, sort_keys=True)
        self._writer.add_key_value_metadata({METADATA_KEY: document})
        self._writer.close()
        self._closed = True
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the partial file; ``error`` (what stopped the writing) passes through
        ``atomic_path``, which names the file on an ``OSError`` that lacks a name."""
        if not self._closed:
            with contextlib.suppress(Exception):  # a writer that failed may fail to close
                self._writer.close()
            self._closed = True
            error = error or RuntimeError("aborted")
            self._atomic.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> PseudoLabelWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException as error:  # e.g. the disk filled up on the last write
                self.abort(error)
                raise
        else:
            self.abort(value)


def read_pseudolabel_metadata(path: str | Path) -> dict:
    """The metadata of a pseudo-label file, validated (format, version, classes).

    Raises:
        UserError: the file is missing, not Parquet, not a pseudo-label file, or newer.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"pseudo-label file not found: {path} (make it with `zmdevice label`)")
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for non-Parquet bytes
        raise UserError(
            f"{path} is not a Parquet file ({error}); give a `zmdevice label` output"
        ) from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise UserError(
            f"{path} is a Parquet file without zmdevice pseudo-label metadata; "
            "give a file written by `zmdevice label`"
        )
    try:
        metadata = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path}: its pseudo-label metadata is not valid JSON ({error}); the file is "
            "corrupt, relabel with `zmdevice label`"
        ) from None
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: its pseudo-label metadata is not a JSON object; relabel")
    if metadata.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a zmdevice pseudo-label file (format {metadata.get('format')!r})"
        )
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{path} has pseudo-label format version {metadata['format_version']}, newer than "
            f"this zmdevice reads ({FORMAT_VERSION}): upgrade zmdevice"
        )
    for column in ("id", "label", "topk_idx", "topk_prob"):
        if column not in schema.names:
            raise UserError(f"{path} lacks the column '{column}': relabel with `zmdevice label`")
    _check_schema(path, schema)
    classes = metadata.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(name, str) and name for name in classes)
        or len(set(classes)) != len(classes)
        or not isinstance(metadata.get("teacher"), dict)
        or not isinstance(metadata.get("data"), dict)
    ):
        raise UserError(
            f"{path}: its pseudo-label metadata lacks a valid class list, teacher or data "
            "entry; the file is corrupt, relabel with `zmdevice label`"
        )
    metadata["path"] = str(path)
    return metadata


def _check_schema(path: Path, schema) -> None:
    """UserError unless the columns have the file's types (string, int, int lists, floats)."""
    import pyarrow as pa

    def is_list_of(column, test):
        kind = schema.field(column).type
        return pa.types.is_list(kind) and test(kind.value_type)

    expected = {
        "id": (pa.types.is_string(schema.field("id").type), "string"),
        "label": (pa.types.is_integer(schema.field("label").type), "integer"),
        "topk_idx": (is_list_of("topk_idx", pa.types.is_integer), "list of integers"),
        "topk_prob": (is_list_of("topk_prob", pa.types.is_floating), "list of floats"),
    }
    for column, (ok, kind) in expected.items():
        if not ok:
            raise UserError(
                f"{path}: column '{column}' has type {schema.field(column).type}, not {kind}; "
                "the file was not written by `zmdevice label`, relabel"
            )


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """Turn pyarrow's errors for damaged bytes (bad zstd block, torn page) into UserError."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(
            f"{path} is corrupt ({reason}); relabel with `zmdevice label` or restore a copy"
        ) from None


def check_classes(path: str | Path, recorded: list[str], expected: list[str]) -> None:
    """UserError unless the file's class list equals ``expected`` (same names, same order)."""
    if list(recorded) == list(expected):
        return
    if sorted(recorded) == sorted(expected):
        raise UserError(
            f"{path} has the classes in another order ({listing(recorded)}) than expected "
            f"({listing(expected)}): give the classes in the file's order or relabel"
        )
    extra = [c for c in recorded if c not in expected]
    absent = [c for c in expected if c not in recorded]
    parts = []
    if absent:
        parts.append(f"lacks {listing(absent, 5)}")
    if extra:
        parts.append(f"has other classes {listing(extra, 5)}")
    raise UserError(
        f"{path} was labeled for other classes ({'; '.join(parts)}): relabel with "
        "`zmdevice label --classes ...` for these classes"
    )


def read_pseudolabels(path: str | Path, *, classes: list[str] | None = None) -> PseudoLabels:
    """Read and validate a pseudo-label file.

    Args:
        path: the Parquet file written by ``zmdevice label``.
        classes: when given, the file's class list must equal it (names and order).

    Raises:
        UserError: see :func:`read_pseudolabel_metadata`, :func:`check_classes`; or corrupt rows.
    """
    import pyarrow.parquet as pq

    metadata = read_pseudolabel_metadata(path)
    if classes is not None:
        check_classes(path, metadata["classes"], classes)
    with _reading(path):
        table = pq.read_table(path)
    ids, label, offsets, flat_idx, flat_prob = _validated_rows(
        path, table, len(metadata["classes"])
    )
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate ids; combine shards with `zmdevice label --combine`")
    counts = np.diff(offsets)
    width = int(counts.max()) if len(counts) else 0
    topk_idx = np.full((len(ids), width), -1, dtype=np.int32)
    topk_prob = np.zeros((len(ids), width), dtype=np.float16)
    rows = np.repeat(np.arange(len(ids)), counts)
    cols = np.arange(len(flat_idx)) - np.repeat(offsets[:-1], counts)
    topk_idx[rows, cols] = flat_idx
    topk_prob[rows, cols] = flat_prob
    return PseudoLabels(ids, label, topk_idx, topk_prob, metadata)


def read_row_groups(path: str | Path, num_classes: int) -> Iterator:
    """A pseudo-label file's row groups as Arrow tables, streamed, each checked as
    ``read_pseudolabels`` checks rows (UserError naming ``path``)."""
    import pyarrow.parquet as pq

    with _reading(path):
        source = pq.ParquetFile(path)
    for group in range(source.num_row_groups):
        with _reading(path):
            table = source.read_row_group(group)
        _validated_rows(path, table, num_classes)
        yield table


def _validated_rows(path, table, num_classes: int):
    """The rows of a pseudo-label table as flat arrays, checked for what no writer produces.

    Returns:
        (ids, label int64 [N], offsets int [N + 1], class indices int32 [M], float16
        probabilities [M]), row i's entries at ``offsets[i]:offsets[i + 1]``.

    Raises:
        UserError: empty cells, lists of different lengths, what ``topk.rows_problem`` refuses.
    """
    if any(table.column(name).null_count for name in ("id", "label", "topk_idx", "topk_prob")):
        raise UserError(f"{path}: empty cells; the file is corrupt, relabel with `zmdevice label`")
    ids = table.column("id").to_pylist()
    label = table.column("label").to_numpy().astype(np.int64)
    idx_col = table.column("topk_idx").combine_chunks()
    prob_col = table.column("topk_prob").combine_chunks()
    offsets = idx_col.offsets.to_numpy()
    counts = np.diff(offsets)
    flat_idx = idx_col.values.to_numpy(zero_copy_only=False).astype(np.int32)
    flat_prob = prob_col.values.to_numpy(zero_copy_only=False).astype(np.float16)
    if len(flat_idx) != len(flat_prob) or np.any(np.diff(prob_col.offsets.to_numpy()) != counts):
        raise UserError(f"{path}: topk_idx and topk_prob lists differ in length; relabel")
    problem = rows_problem(label, offsets, flat_idx, flat_prob, num_classes)
    if problem:
        raise UserError(f"{path}: {problem}")
    return ids, label, offsets, flat_idx, flat_prob
