"""The parts folder of a resumable labeling run: ``.NAME.parquet.parts/`` beside the
output holds ``run.json`` (the settings and creation time) and one finished pseudo-label
file per chunk, ``part-NNNNNN.parquet``, each written atomically. A resumed run checks the
settings, the precision and runtime it resolved, and every finished part before it labels
the rest."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zmdevice.errors import (
    UserError,
    claim,
    missing_folders,
    remove_empty_folders,
    write_text_atomic,
)
from zmdevice.labeling.join import ANSWERS
from zmdevice.pseudolabels import PseudoLabelWriter, read_pseudolabel_metadata

_PART_NAME = re.compile(r"part-(\d+)\.parquet")


def finished_parts(parts_dir: Path) -> dict[int, Path]:
    """Chunk number -> its finished part file in ``parts_dir``."""
    if not parts_dir.is_dir():
        return {}
    found = {}
    for path in parts_dir.iterdir():
        match = _PART_NAME.fullmatch(path.name)
        if match:
            found[int(match[1])] = path
    return found


def read_run(parts_dir: Path) -> dict:
    """The interrupted run's run.json; UserError naming it when it is unreadable."""
    run_file = parts_dir / "run.json"
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(run.get("settings"), dict) or not isinstance(run.get("created"), str):
            raise ValueError("no settings or creation time")
    except (OSError, ValueError, AttributeError) as error:
        reason = " ".join(str(error).split())[:120]
        raise UserError(
            f"{run_file} of an interrupted run is unreadable ({reason}); delete the folder "
            f"{parts_dir} to start over"
        ) from None
    return run


def lock_path(parts_dir: Path) -> Path:
    """``.NAME.parquet.parts`` -> ``.NAME.parquet.lock``: beside the parts folder, which a
    fresh run deletes and rebuilds, and which the finished run removes."""
    return parts_dir.with_name(parts_dir.name.removesuffix(".parts") + ".lock")


@contextlib.contextmanager
def claim_parts(parts_dir: Path, out: Path) -> Iterator[None]:
    """Context manager: this process alone labels into ``out`` and its ``parts_dir`` for the
    block (``zmdevice.errors.claim``); a second run on the same output (``--resume`` twice at
    once) is refused naming the first one's pid, host and start time.

    The output's folder is made for the lock if missing (``runs/labels/`` on a first run);
    a run that ends without writing anything in it removes it again, so a refused run
    leaves no trace.

    Raises:
        UserError: another live run holds the output.
    """
    made = missing_folders(parts_dir.parent)
    parts_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with claim(lock_path(parts_dir), f"--out {out}"):
            yield
    finally:
        remove_empty_folders(made)


def check_parts(parts_dir: Path, settings: dict, resume: bool, out: Path) -> set[int]:
    """The chunk numbers an interrupted run finished (checked, nothing written).

    Raises:
        UserError: finished parts without --resume, other settings, an unreadable run.json
            or part file.
    """
    from zmdevice.pseudolabels import read_pseudolabels

    done = finished_parts(parts_dir)
    if not done:
        return set()
    if not resume:
        raise UserError(
            f"{out}: an interrupted run left {len(done)} finished chunk(s) in {parts_dir}; "
            "pass --resume to continue it, or delete that folder to start over"
        )
    previous = read_run(parts_dir)["settings"]
    differs = [k for k in settings if previous.get(k) != settings[k]]
    if differs:
        raise UserError(
            f"--resume: the interrupted run in {parts_dir} used other settings "
            f"({', '.join(differs)}); rerun with the same ones, or delete that folder"
        )
    for path in done.values():
        try:
            read_pseudolabels(path)
        except UserError:
            raise UserError(
                f"--resume: the finished chunk {path} of the interrupted run is corrupt; "
                "delete that file and rerun with --resume to label its samples again"
            ) from None
    return set(done)


def start_parts(parts_dir: Path, settings: dict) -> dict:
    """A fresh parts folder with its run.json (an earlier unfinished one is replaced)."""
    import datetime

    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    run = {"settings": settings, "created": created}
    write_text_atomic(parts_dir / "run.json", json.dumps(run))
    return run


def check_same_numerics(parts_dir: Path, done: set[int], info: dict) -> None:
    """A resumed run must label at the precision and runtime of the interrupted one. The
    resolved ones are compared, not the flags: ``auto`` resolves per machine, and an explicit
    flag equal to what ``auto`` gave before is the same run."""
    if not done:
        return
    before = read_pseudolabel_metadata(parts_dir / f"part-{min(done):06d}.parquet")["teacher"]
    keys = ("precision", "runtime")
    if any(before.get(k) != info.get(k) for k in keys):
        raise UserError(
            f"--resume: the interrupted run in {parts_dir} labeled with precision "
            f"{before.get('precision')}, runtime {before.get('runtime')}; this one resolved "
            f"{info['precision']}, {info['runtime']}: pass --precision {before.get('precision')} "
            f"--runtime {before.get('runtime')}, or delete that folder"
        )


def write_part(parts_dir, number, metadata, ids, probs, skipped, stats) -> None:
    """Write chunk ``number`` atomically: ``ids``, their probabilities (float32 [n, C] in id
    order; None without ids), the skipped ids and the teacher's counters for this chunk."""
    part_meta = dict(metadata)
    part_meta["skipped"] = {"count": len(skipped), "examples": skipped[:10]}
    if stats:
        part_meta[ANSWERS] = stats
    with PseudoLabelWriter(parts_dir / f"part-{number:06d}.parquet", part_meta) as writer:
        if ids:
            writer.write_probs(ids, probs)


def labels_by_id(parts: list[Path]) -> dict[str, int]:
    """id -> pseudo-label of everything labeled in this run (read back from the parts)."""
    import pyarrow.parquet as pq

    known: dict[str, int] = {}
    for part in parts:
        table = pq.read_table(part, columns=["id", "label"])
        ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
        known.update(zip(ids, labels, strict=True))
    return known


def features_path(part: Path) -> Path:
    """The FM features kept beside a part file for --refine."""
    return part.with_name(part.stem + ".features.npy")


def write_part_features(parts_dir: Path, number: int, features: np.ndarray) -> None:
    """The [n, D] features of part ``number``, as float16 (``.npy``: read back without
    pickle)."""
    from zmdevice.errors import atomic_path

    target = features_path(parts_dir / f"part-{number:06d}.parquet")
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        np.save(handle, features.astype(np.float16), allow_pickle=False)


def read_parts_outputs(unrefined: Path, parts: list[Path]):
    """The joined zero-shot labels of ``unrefined`` and the FM features the parts kept.

    Returns:
        (the ``PseudoLabels`` of ``unrefined``, features float16 [N, D] in its row order).
    """
    from zmdevice.pseudolabels import read_pseudolabels

    labels = read_pseudolabels(unrefined)
    features = []
    for part in parts:
        path = features_path(part)
        try:
            features.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as error:
            raise UserError(
                f"{path}: FM features of a finished part are unreadable ({error}); delete "
                f"that part and its .features.npy, then rerun with --resume"
            ) from error
    features = np.concatenate(features)
    if len(features) != len(labels.ids):
        raise UserError(
            f"{parts[0].parent}: the parts' features cover {len(features)} samples, their "
            f"labels {len(labels.ids)}; delete that folder and label again"
        )
    return labels, features
