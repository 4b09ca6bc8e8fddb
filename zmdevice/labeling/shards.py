"""Where a labeling run writes, and ``--shard I/N``: the I-th of N contiguous slices of the
data (0-based) goes to ``NAME.shard-I-of-N.parquet``; ``--combine`` joins the N shard files
into ``NAME.parquet``."""

from __future__ import annotations

import re
from pathlib import Path

from zmdevice.config import RUNS
from zmdevice.errors import UserError
from zmdevice.labeling.join import combine_pseudolabels
from zmdevice.pseudolabels import check_classes, read_pseudolabel_metadata


def default_out(data: Path, teacher: str, made: str | None = None) -> Path:
    """runs/labels/<data name>-<teacher>[-<made>].parquet (the folder name for an image folder).

    The teacher is part of the name so that labeling a text table and an image folder that
    share a name (``unlabeled.csv``, ``unlabeled/``), or one data set with two teachers,
    never overwrites an earlier file; ``made`` tells labels made otherwise than zero-shot
    (``fewshot``: from labeled examples, ``refined``: spread without them) apart from the
    zero-shot ones. A ``kind:spec`` teacher keeps the last component of each path in it:
    ``text-embed:/models/e5`` -> ``text-embed-e5``.
    """
    name = data.name if data.is_dir() else data.stem
    parts = [Path(part).name if "/" in part else part for part in teacher.split(":")]
    teacher_name = re.sub(r"[^A-Za-z0-9._=-]+", "-", "-".join(parts)).strip("-.")
    suffix = f"-{made}" if made else ""
    return RUNS / "labels" / f"{name}-{teacher_name}{suffix}.parquet"


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; None stays None."""
    if shard is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not int(match[1]) < int(match[2]):
        raise UserError(f"--shard '{shard}': use I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(match[1]), int(match[2])


def shard_path(out: Path, index: int, count: int) -> Path:
    """Where shard I of N of ``out`` goes: NAME.shard-I-of-N.parquet."""
    return out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def shard_range(length: int, index: int, count: int) -> range:
    """The I-th of N contiguous, near-equal slices of range(length)."""
    return range(length * index // count, length * (index + 1) // count)


def combine_shards(out: Path, teacher: str, classes: str) -> dict:
    """Join NAME.shard-I-of-N.parquet (I = 0..N-1) beside ``out`` into ``out``.

    Args:
        teacher: the ``--teacher`` the shards must have been labeled by.
        classes: the ``--classes`` they must have been labeled for, in that order.

    Returns:
        The joined file's metadata.
    """
    paths = shard_files(out)
    first = read_pseudolabel_metadata(paths[0])
    if first["teacher"].get("name") != teacher:
        raise UserError(
            f"--combine: {paths[0]} was labeled by teacher '{first['teacher'].get('name')}', "
            f"not '{teacher}'"
        )
    from zmdevice.classes import load_classes

    check_classes(paths[0], first["classes"], load_classes(classes).names)
    return combine_pseudolabels(paths, out)


def shard_files(out: Path) -> list[Path]:
    """The shard files 0..N-1 of one split of ``out``, in order.

    Raises:
        UserError: none found, shards of several splits, or some shard missing.
    """
    pattern = re.compile(re.escape(out.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(out.suffix))
    found = {}
    for path in out.parent.glob(f"{out.stem}.shard-*-of-*{out.suffix}"):
        match = pattern.fullmatch(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    if not found:
        raise UserError(
            f"--combine: no shard files {out.stem}.shard-I-of-N{out.suffix} in "
            f"{out.parent.resolve()}; copy the shards there or give --out"
        )
    totals = {n for _, n in found}
    if len(totals) > 1:
        raise UserError(
            f"--combine: shard files of different splits ({sorted(totals)}) in "
            f"{out.parent}; keep one set of N"
        )
    total = totals.pop()
    missing = [i for i in range(total) if (i, total) not in found]
    if missing:
        raise UserError(
            f"--combine: shard(s) {', '.join(map(str, missing))} of {total} missing in "
            f"{out.parent} (expected {shard_path(out, missing[0], total).name})"
        )
    return [found[(i, total)] for i in range(total)]
