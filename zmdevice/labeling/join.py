"""Joining the files of one labeling job: the parts of a run into its output, or the shard
outputs of ``--shard I/N`` into one file (``--combine``).

What may differ between the files of one job, and how it adds up, is the job's knowledge,
not the file format's: the creation time, quality report and shard name are per file; the
skipped samples and the teacher's counters (``answers``: the LLM teacher's mapped and
unmapped answers, ``teacher.stats``) add up. Everything else must agree.
"""

from __future__ import annotations

from pathlib import Path

from zmdevice.errors import UserError
from zmdevice.pseudolabels import PseudoLabelWriter, read_pseudolabel_metadata, read_row_groups

ANSWERS = "answers"
"""Metadata key of the teacher's counters for the samples of a file (``teacher.stats``)."""
PER_FILE_KEYS = {"created", "quality", "path", "shard", "skipped", "count", ANSWERS}
"""Metadata entries that may legitimately differ between the files of one labeling job."""


def combine_pseudolabels(
    paths: list[str | Path], out: str | Path, *, metadata_update: dict | None = None
) -> dict:
    """Concatenate shard (or part) files of one labeling job into one file, streaming.

    All inputs must agree on classes, teacher, data fingerprint and top-k settings; ids
    must not repeat. The first quality report found is kept; skipped-sample counts and the
    teacher's counters add up.

    Returns:
        The combined file's metadata.

    Raises:
        UserError: no inputs, a mismatch (naming both files and the key), or repeated ids.
    """
    if not paths:
        raise UserError(f"nothing to combine into {out}: no shard files given or found")
    metas = [read_pseudolabel_metadata(p) for p in paths]
    check_same_job(paths, metas)
    combined = joined_metadata(metas)
    combined.update(metadata_update or {})
    seen: set[str] = set()
    with PseudoLabelWriter(out, combined) as writer:
        for path in paths:
            for table in read_row_groups(path, len(combined["classes"])):
                ids = table.column("id").to_pylist()
                repeated = seen.intersection(ids)
                if repeated:
                    raise UserError(
                        f"cannot combine: id {sorted(repeated)[0]!r} appears in more than one "
                        f"file (again in {path}); give each shard once"
                    )
                seen.update(ids)
                writer.write_table(table)
    return combined


def check_same_job(paths: list, metas: list[dict]) -> None:
    """UserError naming the first key (outside ``PER_FILE_KEYS``) two files differ in."""
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        for key in sorted(set(first) | set(meta)):
            if key in PER_FILE_KEYS:
                continue
            if first.get(key) != meta.get(key) and not (
                key == "data" and _same_data(first[key], meta.get(key))
            ):
                raise UserError(
                    f"cannot combine {paths[0]} and {path}: their '{key}' differ; "
                    "shards must come from one job (same data, classes, teacher, top-k)"
                )


def joined_metadata(metas: list[dict]) -> dict:
    """The metadata of the files ``metas`` joined: the first one's, with the per-file
    entries joined (see the module doc)."""
    first = metas[0]
    combined = {k: v for k, v in first.items() if k != "path"}
    combined["data"] = {k: v for k, v in first["data"].items() if k != "shard"}
    shards = {(m.get("data") or {}).get("shard") for m in metas}
    # Parts of one shard stay that shard; different shards together are the whole data.
    combined["data"]["shard"] = shards.pop() if len(shards) == 1 else None
    combined["quality"] = next((m["quality"] for m in metas if m.get("quality")), None)
    skipped = [m.get("skipped") or {} for m in metas]
    combined["skipped"] = {
        "count": sum(int(s.get("count", 0)) for s in skipped),
        "examples": [e for s in skipped for e in s.get("examples", [])][:10],
    }
    counters = [m.get(ANSWERS) for m in metas if m.get(ANSWERS)]
    if counters:
        combined[ANSWERS] = {
            key: sum(c.get(key, 0) for c in counters)
            for key in sorted({k for c in counters for k in c})
        }
    return combined


def _same_data(a: dict, b: dict | None) -> bool:
    """Shards of one data set share everything in ``data`` except the shard name."""
    if b is None:
        return False
    return {k: v for k, v in a.items() if k != "shard"} == {
        k: v for k, v in b.items() if k != "shard"
    }
