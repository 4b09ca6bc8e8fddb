"""``report.md`` and ``curves.png`` of a training run, read back from ``metrics.jsonl``.

The curves show, per stage, the named losses (loss, sup, unsup, kd), the mask rate, and
the held-out agreement with the FM (stage 1) and test accuracy when they were measured.
matplotlib runs on the Agg backend (no display needed); it is imported here only.
"""

from __future__ import annotations

import json
from pathlib import Path

from zmdevice.errors import atomic_path, write_text_atomic

LOSS_KEYS = ("loss", "sup", "unsup", "kd")
RATE_KEYS = ("mask_rate", "pl_accuracy", "kd_agreement")
EVAL_KEYS = ("heldout_agreement", "heldout_gold_accuracy", "test_accuracy")


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_report(out: Path, summary: dict) -> None:
    """Write ``out/report.md`` and ``out/curves.png`` from the summary and metrics.jsonl."""
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, out / "curves.png")
    write_text_atomic(out / "report.md", render_markdown(summary, records))


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
    for index, stage in enumerate(summary["stages"]):
        mine = [r for r in records if r["stage_index"] == index]
        losses = [r for r in mine if "loss" in r]
        evals = [r for r in mine if any(k in r for k in EVAL_KEYS)]
        last_loss = f"{losses[-1]['loss']:.4f}" if losses else "-"
        masks = [r["mask_rate"] for r in mine if "mask_rate" in r]
        last_mask = f"{masks[-1]:.2f}" if masks else "-"
        last_eval = "-"
        if evals:
            last_eval = ", ".join(
                f"{k} {100 * evals[-1][k]:.1f}%" for k in EVAL_KEYS if k in evals[-1]
            )
        lines.append(
            f"| {stage['stage']} | {stage['steps']} | {stage['seconds']} | {last_loss} "
            f"| {last_mask} | {last_eval} |"
        )
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
    if "test_accuracy" in summary:
        lines += [
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
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


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

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (axes[0], LOSS_KEYS, "losses"),
        (axes[1], RATE_KEYS, "rates"),
        (axes[2], EVAL_KEYS, "evaluation"),
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
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)
