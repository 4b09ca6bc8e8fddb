"""What ``zmdevice label`` prints and returns once the output is written."""

from __future__ import annotations

import numpy as np

from zmdevice.errors import listing
from zmdevice.label_source import decision_line
from zmdevice.labeling.join import ANSWERS
from zmdevice.refine import refine_line


def summary(out, metadata, labeled_now, elapsed, quality_lines, workers, where) -> dict:
    """The run's summary dict (see ``run_label``) with its printed ``lines``.

    Args:
        labeled_now: samples this run labeled (a resumed run's parts not counted).
        elapsed: seconds they took.
        where: what they were labeled on ("cpu", "Ray (2 teacher workers)").
    """
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["label"])
    labels = table.column("label").to_numpy()
    names = metadata["classes"]
    counts = np.bincount(labels, minlength=len(names)) if len(labels) else np.zeros(len(names))
    size = out.stat().st_size
    rate = labeled_now / elapsed if elapsed > 0 else 0.0
    skipped = (metadata.get("skipped") or {}).get("count", 0)
    teacher = metadata["teacher"]
    lines = [
        f"wrote {out}: {len(labels)} samples, {len(names)} classes, teacher {teacher['spec']}",
        f"  {rate:.1f} samples/s this run on {where} ({teacher_numerics(metadata)}, "
        f"{workers} loader workers); "
        f"{size / max(len(labels), 1):.1f} bytes/sample ({size / 1024:.1f} KiB)",
        "  pseudo-label counts: "
        + listing(f"{n} {int(c)}" for n, c in zip(names, counts, strict=True)),
    ]
    if skipped:
        lines.append(
            f"  skipped {skipped} unreadable samples (e.g. {metadata['skipped']['examples'][0]})"
        )
    lines += detail_lines(metadata) + quality_lines
    return {
        "out": str(out),
        "count": int(len(labels)),
        "classes": names,
        "teacher": teacher["spec"],
        "precision": teacher.get("precision"),
        "runtime": teacher.get("runtime"),
        "calibration": teacher.get("calibration"),
        "samples_per_s": rate,
        "bytes": size,
        "bytes_per_sample": size / max(len(labels), 1),
        "label_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "skipped": skipped,
        "answers": metadata.get(ANSWERS),
        "label_source": (teacher.get("label_source") or {}).get("chosen"),
        "quality": metadata.get("quality"),
        "lines": lines,
    }


def detail_lines(metadata: dict) -> list[str]:
    """One line each for the calibration, the label source, the refinement and the LLM
    teacher's answers, where the file has them."""
    from zmdevice.calibrate import calibration_line

    teacher, lines = metadata["teacher"], []
    calibration = calibration_line(teacher.get("calibration"))
    if calibration:
        lines.append(calibration)
    if teacher.get("label_source"):
        lines.append(f"  {decision_line(teacher['label_source'])}")
    if teacher.get("refine"):
        lines.append(f"  {refine_line(teacher['refine'])}")
    answers = metadata.get(ANSWERS)
    if answers:
        lines.append(
            f"  LLM answers: {answers.get('mapped', 0)} mapped to a class, "
            f"{answers.get('unmapped', 0)} unmappable (labeled by class-name likelihood)"
        )
    return lines


def teacher_numerics(metadata: dict) -> str:
    """ "bf16, torch runtime": how the teacher of a pseudo-label file ran (older files: fp32)."""
    teacher = metadata["teacher"]
    return f"{teacher.get('precision', 'fp32')}, {teacher.get('runtime', 'torch')} runtime"
