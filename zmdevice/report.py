"""What a training run leaves for people: ``report.md``, ``curves.png`` and the model card.

``report.md`` and ``curves.png`` are read back from ``metrics.jsonl``: per stage, the named
losses (loss, sup, unsup, kd), the mask rate, and the held-out agreement with the FM
(stage 1) and test accuracy when they were measured, and the stage-2 collapse guard's
evaluations with any rollback (``training.guard``). matplotlib runs on the Agg backend
(no display needed); it is imported here only. The model card ``README.md`` is
``zmdevice.model_card``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from zmdevice.errors import atomic_path, write_text_atomic
from zmdevice.model_card import render_model_card

LOSS_KEYS = ("loss", "sup", "unsup", "kd")
RATE_KEYS = ("mask_rate", "pl_accuracy", "kd_agreement")
EVAL_KEYS = ("heldout_agreement", "heldout_gold_accuracy", "test_accuracy")
GUARD_KEYS = ("guard_heldout_agreement", "guard_labeled_accuracy")


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_report(out: Path, summary: dict) -> None:
    """Write ``out/report.md``, ``out/curves.png`` and the model card ``out/README.md``."""
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, out / "curves.png")
    write_text_atomic(out / "report.md", render_markdown(summary, records))
    write_text_atomic(out / "README.md", render_model_card(out, summary))


def render_markdown(summary: dict, records: list[dict]) -> str:
    """The report page: settings, per-stage numbers, final test results."""
    lines = [
        f"# {summary['student']} trained with {summary['method']}",
        "",
        f"- device: {summary['device']}, precision {summary.get('precision', 'fp32')}"
        f" ({summary.get('precision_reason', 'not recorded')}); {summary['seconds']} s in all",
        f"- {summary['labeled']} labeled, {summary['unlabeled']} unlabeled samples, "
        f"{len(summary['classes'])} classes",
        "",
        "| stage | steps | seconds | last loss | last mask rate | last eval |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        _stage_row(stage, [r for r in records if r["stage_index"] == index])
        for index, stage in enumerate(summary["stages"])
    ]
    lines.append("")
    if "heldout_agreement" in summary:
        lines.append(
            f"Stage-1 model selection: held-out agreement with the FM "
            f"{100 * summary['heldout_agreement']:.1f}% at step {summary['best_kd_step']}."
        )
    if summary.get("bn_recalibrated_on"):
        lines.append(
            f"BatchNorm statistics re-estimated on {summary['bn_recalibrated_on']} clean "
            "unlabeled images before saving."
        )
    lines += _test_results(summary)
    lines += guard_section(summary, records)
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def _stage_row(stage: dict, mine: list[dict]) -> str:
    """A stage's table row: its steps and seconds, and the last of its records' values."""
    losses = [r for r in mine if "loss" in r]
    evals = [r for r in mine if any(k in r for k in EVAL_KEYS)]
    last_loss = f"{losses[-1]['loss']:.4f}" if losses else "-"
    masks = [r["mask_rate"] for r in mine if "mask_rate" in r]
    last_mask = f"{masks[-1]:.2f}" if masks else "-"
    last_eval = "-"
    if evals:
        last_eval = ", ".join(f"{k} {100 * evals[-1][k]:.1f}%" for k in EVAL_KEYS if k in evals[-1])
    return (
        f"| {stage['stage']} | {stage['steps']} | {stage['seconds']} | {last_loss} "
        f"| {last_mask} | {last_eval} |"
    )


def _test_results(summary: dict) -> list[str]:
    """The test accuracy and the per-class table, as markdown lines (none without --test)."""
    if "test_accuracy" not in summary:
        return []
    lines = [
        "",
        f"## Test: accuracy {100 * summary['test_accuracy']:.1f}%, "
        f"macro-F1 {100 * summary['test_macro_f1']:.1f}%",
        "",
        "| class | recall | precision | support |",
        "|---|---|---|---|",
    ]
    for name, row in _per_class(summary.get("test_report", {})):
        lines.append(
            f"| {name} | {100 * row.get('recall', 0):.1f}% "
            f"| {100 * row.get('precision', 0):.1f}% | {row.get('support', '')} |"
        )
    return lines


def guard_section(summary: dict, records: list[dict]) -> list[str]:
    """The collapse guard's stage-2 evaluations and its verdict, as markdown lines (none
    when the guard did not observe)."""
    observed = [r for r in records if "guard_class_entropy" in r]
    if not observed:
        return []
    fired = summary.get("collapse")
    suspected = {r["step"] for r in records if "collapse_suspected" in r}
    start = observed[0].get("guard_class_counts")
    rows = [_guard_row(r, start, _guard_note(r["step"], suspected, fired)) for r in observed]
    return [
        "",
        "## Stage-2 collapse guard",
        "",
        f"Verdict: {_guard_verdict(fired)}",
        "",
        "| stage-2 step | agreement with the pseudo-labels | floor | class entropy "
        "| smallest class kept | labeled accuracy | |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _guard_verdict(fired: dict | None) -> str:
    if fired is None:
        return "no collapse: stage 2 kept every step."
    back = fired.get("rolled_back_to")
    done = "kept the weights as they were" if back is None else (
        f"**rolled back to the weights of stage-2 step {back}**"
    )  # fmt: skip
    return f"**collapse at stage-2 step {fired['step']}**: {fired['reason']}; {done}."


def _guard_note(step: int, suspected: set, fired: dict | None) -> str:
    """The last column of a guard row: what the guard made of that evaluation."""
    note = ""
    if step in suspected:
        note = "suspected"
    if fired is not None and step == fired["step"]:
        note = "collapse"
    if fired is not None and step == fired.get("rolled_back_to"):
        note = "rolled back to"
    return note


def _guard_row(record: dict, start, note: str) -> str:
    return (
        f"| {record['step']} | {percent(record.get('guard_heldout_agreement'))} "
        f"| {percent(record.get('guard_agreement_floor'))} | {record['guard_class_entropy']:.3f} "
        f"| {percent(smallest_kept(start, record.get('guard_class_counts')))} "
        f"| {percent(record.get('guard_labeled_accuracy'))} | {note} |"
    )


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def smallest_kept(start, counts) -> float | None:
    """The smallest share of its stage-2-start predictions that a class keeps."""
    if not start or not counts:
        return None
    shares = [now / before for before, now in zip(start, counts, strict=True) if before > 0]
    return min(shares, default=None)


def _per_class(report: dict):
    per_class = report.get("per_class", {})
    if isinstance(per_class, dict):
        return list(per_class.items())
    return [(row.get("class", str(i)), row) for i, row in enumerate(per_class)]


def plot_curves(records: list[dict], path: Path) -> None:
    """Three panels over the global step: losses, rates, evaluations; stage borders dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = (
        (axes[0], LOSS_KEYS, "losses"),
        (axes[1], RATE_KEYS, "rates"),
        (axes[2], EVAL_KEYS, "evaluation"),
        (axes[3], GUARD_KEYS, "stage-2 collapse guard"),
    )
    for axis, keys, title in panels:
        for key in keys:
            points = [(r["global_step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=8)
    borders = sorted({r["global_step"] - r["step"] for r in records if r.get("stage_index", 0) > 0})
    for axis in axes:
        for border in borders:
            axis.axvline(border, color="grey", linestyle="--", linewidth=0.8)
    plot_guard_marks(axes[3], records)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)


def plot_guard_marks(axis, records: list[dict]) -> None:
    """The agreement floor, the smallest share a class kept, and a collapse: a red line at
    the step it acted, a red dot on the weights it rolled back to."""
    observed = [r for r in records if "guard_class_entropy" in r]
    if not observed:
        return
    start = observed[0].get("guard_class_counts")
    kept = [(r["global_step"], smallest_kept(start, r.get("guard_class_counts"))) for r in observed]
    kept = [(step, share) for step, share in kept if share is not None]
    if kept:
        axis.plot(*zip(*kept, strict=True), label="smallest class kept", marker=".")
    floor = observed[0].get("guard_agreement_floor")
    if floor is not None:
        axis.axhline(floor, color="tab:blue", linestyle=":", label="agreement floor")
    offset = observed[0]["global_step"] - observed[0]["step"]
    for record in records:
        if "collapse" not in record:
            continue
        axis.axvline(record["global_step"], color="red", linewidth=1.5, label="collapse")
        back = [r for r in observed if r["step"] == record.get("rolled_back_to")]
        for target in back:
            axis.plot([target["global_step"]], [target.get("guard_heldout_agreement") or 0],
                      "o", color="red", label="rolled back to")  # fmt: skip
    axis.set_xlim(left=min(offset, axis.get_xlim()[0]))
    axis.legend(fontsize=8)
