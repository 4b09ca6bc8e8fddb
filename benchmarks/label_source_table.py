"""benchmarks/LABEL_SOURCE.md from the label-source screens' JSON files (dev only).

    python benchmarks/peers.py label-source    # benchmarks/results/<data>-dev-label-source.json
    python benchmarks/label_source_table.py    # the tables, generated, never typed

Per data set and labels per class: the dev accuracy of the labels each way of choosing gives
(cross-validation, the old rule, each fixed candidate, the best candidate per draw), the
choice per draw, and whether the choice moves with ``MAX_FOLDS`` 3 instead of 5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper import ALL_DATASETS, RESULTS, ROOT  # noqa: E402

TABLE = ROOT / "benchmarks" / "LABEL_SOURCE.md"
SHORT = {"refined": "rf", "few-shot": "fs", "refined-no-prior": "rf0", "zero-shot": "zs"}
"""Candidate -> its abbreviation in the choice columns."""


def cell(values: list[float]) -> str:
    """'mean (v0 / v1 / v2)' in %."""
    per_seed = " / ".join(f"{100 * v:.1f}" for v in values)
    return f"{100 * np.mean(values):.1f} ({per_seed})"


def choices(names: list[str]) -> str:
    """Abbreviated choice per seed, flagged when the seeds disagree."""
    text = " / ".join(SHORT[n] for n in names)
    return text + (" (flips)" if len(set(names)) > 1 else "")


def load() -> list[dict]:
    results = []
    for name in ALL_DATASETS:
        path = RESULTS / f"{name}-dev-label-source.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def groups(result: dict):
    """(k, rows of that k ordered by seed) per labels-per-class value."""
    for k in sorted({row["labels_per_class"] for row in result["rows"]}):
        rows = sorted((r for r in result["rows"] if r["labels_per_class"] == k),
                      key=lambda r: r["seed"])  # fmt: skip
        yield k, rows


def accuracy_table(results: list[dict]) -> list[str]:
    candidates = results[0]["candidates"]
    head = ["data (classes, FM dev)", "k", "chosen by CV", "old rule", *candidates, "oracle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        label = (f"{result['dataset']} ({result['classes']}, "
                 f"{100 * result['fm_zero_shot_dev_accuracy']:.1f})")  # fmt: skip
        for k, rows in groups(result):
            values = [
                cell([r["chosen_dev_accuracy"] for r in rows]),
                cell([r["old_rule_dev_accuracy"] for r in rows]),
                *(cell([r["dev_accuracy"][name] for r in rows]) for name in candidates),
                cell([r["oracle_dev_accuracy"] for r in rows]),
            ]
            lines.append(f"| {label} | {k} | " + " | ".join(values) + " |")
    return lines


def choice_table(results: list[dict]) -> list[str]:
    fewer = next(key for key in results[0]["rows"][0] if key.startswith("max_folds_"))
    folds = fewer.split("_")[-1]
    head = ["data", "k", "FM right on the labeled", "CV chose", "how", "old rule", "oracle",
            f"MAX_FOLDS {folds} chose", f"dev, MAX_FOLDS {folds}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        for k, rows in groups(result):
            how = sorted({r["how"] for r in rows})
            if how == ["binomial test"]:
                p_values = " / ".join(f"{r['p_value']:.2g}" for r in rows)
                how = [f"binomial, p = {p_values}"]
            elif how == ["cross-validation"]:
                how = [f"cross-validation, {folds_of(rows)} folds"]
            same = [r[fewer]["chosen"] == r["chosen"] for r in rows]
            moved = "" if all(same) else f" (differs on {len(same) - sum(same)})"
            if rows[0][fewer]["how"] == "cross-validation":
                moved += f", {folds_of([r[fewer] for r in rows])} folds"
            values = [
                " / ".join(f"{r['zero_shot_accuracy_on_labeled']:.2f}" for r in rows),
                choices([r["chosen"] for r in rows]),
                ", ".join(how),
                choices([r["old_rule"] for r in rows]),
                choices([r["oracle"] for r in rows]),
                choices([r[fewer]["chosen"] for r in rows]) + moved,
                cell([r[fewer]["chosen_dev_accuracy"] for r in rows]),
            ]
            lines.append(f"| {result['dataset']} | {k} | " + " | ".join(values) + " |")
    return lines


def folds_of(rows: list[dict]) -> str:
    return "/".join(sorted({str(r["folds"]) for r in rows}))


def summary(results: list[dict]) -> list[str]:
    """Mean loss against the oracle, and how often each way matches it, over every draw."""
    rows = [(result["dataset"], r) for result in results for r in result["rows"]]
    fewer = next(key for key in rows[0][1] if key.startswith("max_folds_"))
    lines = ["| over every draw | mean dev accuracy | below the oracle (mean, worst) | "
             "picks the oracle's candidate |", "|---|---|---|---|"]  # fmt: skip
    ways = {
        "chosen by CV": lambda r: (r["chosen_dev_accuracy"], r["chosen"]),
        "old rule": lambda r: (r["old_rule_dev_accuracy"], r["old_rule"]),
        f"CV, {fewer.replace('_', ' ').upper()}": lambda r: (
            r[fewer]["chosen_dev_accuracy"], r[fewer]["chosen"]),
        **{f"always {name}": (lambda r, n=name: (r["dev_accuracy"][n], n))
           for name in results[0]["candidates"]},
        "oracle": lambda r: (r["oracle_dev_accuracy"], r["oracle"]),
    }  # fmt: skip
    for name, way in ways.items():
        scores = [way(r)[0] for _, r in rows]
        losses = [r["oracle_dev_accuracy"] - way(r)[0] for _, r in rows]
        hits = sum(way(r)[1] == r["oracle"] or way(r)[0] == r["oracle_dev_accuracy"]
                   for _, r in rows)  # fmt: skip
        lines.append(
            f"| {name} | {100 * np.mean(scores):.1f} | {100 * np.mean(losses):.1f}, "
            f"{100 * max(losses):.1f} | {hits} of {len(rows)} |"
        )
    return lines


def misses(results: list[dict], points: float = 1.0) -> list[str]:
    """Every draw where cross-validation's choice is ``points`` or more below the oracle."""
    head = ["data", "k", "seed", "CV chose (dev)", "oracle (dev)", "CV accuracy per candidate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        for k, rows in groups(result):
            for r in rows:
                if r["oracle_dev_accuracy"] - r["chosen_dev_accuracy"] < points / 100:
                    continue
                cv = ", ".join(f"{SHORT[n]} {'-' if a is None else f'{100 * a:.0f}'}"
                               for n, a in r["cv_accuracy"].items())  # fmt: skip
                lines.append(
                    f"| {result['dataset']} | {k} | {r['seed']} | {SHORT[r['chosen']]} "
                    f"{100 * r['chosen_dev_accuracy']:.1f} | {SHORT[r['oracle']]} "
                    f"{100 * r['oracle_dev_accuracy']:.1f} | {cv} |"
                )
    return lines


RULES = {
    "CV over all four": ("refined", "few-shot", "refined-no-prior", "zero-shot"),
    "CV over refined, refined-no-prior, zero-shot": ("refined", "refined-no-prior", "zero-shot"),
    "CV over refined, refined-no-prior": ("refined", "refined-no-prior"),
    "CV over refined, few-shot, refined-no-prior": ("refined", "few-shot", "refined-no-prior"),
}
"""The sets of sources ``label_source.choose`` may choose among, screened for
``DEFAULT_SOURCES`` (each scored from the stored cross-validated accuracies)."""


def pick(row: dict, allowed) -> str:
    """What ``choose`` picks among ``allowed`` from a draw's stored CV accuracies (ties to
    the earlier candidate; with nothing scored, the binomial test's order)."""
    from zmdevice import label_source

    names = [n for n in label_source.CANDIDATES if n in allowed]
    cv = row["cv_accuracy"]
    if any(cv[n] is not None for n in names):
        return max(names, key=lambda n: (cv[n], -names.index(n)))
    with_prior = row["p_value"] < label_source.PRIOR_SIGNIFICANCE
    order = label_source.FALLBACK_WITH_PRIOR if with_prior else label_source.FALLBACK_WITHOUT_PRIOR
    return next(n for n in order if n in names)


def rule_screen(results: list[dict]) -> list[str]:
    """Mean dev accuracy of each candidate set of ``RULES`` over every draw, and which set
    wins with each data set left out."""

    def mean(rows, allowed):
        return float(np.mean([r["dev_accuracy"][pick(r, allowed)] for _, r in rows]))

    rows = [(result["dataset"], r) for result in results for r in result["rows"]]
    head = ["chosen among", "every draw", *(f"without {r['dataset']}" for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    winners = []
    for result in results:
        kept = [(d, r) for d, r in rows if d != result["dataset"]]
        winners.append(max(RULES, key=lambda name: mean(kept, RULES[name])))
    for name, allowed in RULES.items():
        cells = [f"{100 * mean(rows, allowed):.2f}"]
        for result, winner in zip(results, winners, strict=True):
            kept = [(d, r) for d, r in rows if d != result["dataset"]]
            value = f"{100 * mean(kept, allowed):.2f}"
            cells.append(f"**{value}**" if winner == name else value)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def stale_rule_note(results: list[dict]) -> list[str]:
    """A warning when the stored screens predate the sign test on dropping the prior."""
    if any(row.get("prior_test") is not None for r in results for row in r["rows"]):
        return []
    return [
        "These screens ran before `choose` asked for a sign test before dropping the prior of",
        "an FM above chance: `chosen by CV` here is plain cross-validation. The shipped rule is",
        "measured over more draws in [`LABEL_SOURCE_DRAWS.md`](LABEL_SOURCE_DRAWS.md).",
        "",
    ]


def main() -> int:
    results = load()
    if not results:
        print("no label-source screens yet: run `python benchmarks/peers.py label-source`")
        return 1
    sets = ", ".join(r["dataset"] for r in results)
    lines = [
        "# Which labels to write: the label source chosen by cross-validation (dev)",
        "",
        "Generated by `python benchmarks/label_source_table.py` from",
        "`benchmarks/results/*-dev-label-source.json` (`python benchmarks/peers.py label-source`);",
        "do not edit by hand. Dev accuracy in % of the labels each way gives the dev samples",
        "(graph nodes beside the pool, unlabeled), mean over the three labeled draws with the",
        "draws in brackets; no student is trained and test is not read. `chosen by CV` is",
        "`zmdevice.label_source.choose`; `old rule` is `refined` with the prior kept iff the",
        "FM's zero-shot labels are right on at least half the labeled examples; `oracle` is the",
        "best candidate on dev per draw (not a rule: the ceiling). Protocol:",
        '`docs/benchmark-protocol.md`, "Choosing the label source".',
        "",
        *stale_rule_note(results),
        f"Data sets: {sets}.",
        "",
        "## Dev accuracy of the labels",
        "",
        *accuracy_table(results),
        "",
        "## Choices per draw (seeds 0 / 1 / 2)",
        "",
        "rf = refined, fs = few-shot, rf0 = refined-no-prior, zs = zero-shot. `how`: cross-",
        "validation (its fold count: `MAX_FOLDS` caps it, a class's examples bound it, so 5",
        "gives 4 folds at 4 labels per class), or the binomial test when one example per class",
        "leaves nothing to score (its p-values per draw: another `PRIOR_SIGNIFICANCE` than 0.05",
        "moves a choice only where a p-value lies between the two levels).",
        "",
        *choice_table(results),
        "",
        "## Over every draw of every data set",
        "",
        *summary(results),
        "",
        "## Which sources to choose among (`DEFAULT_SOURCES`)",
        "",
        "Mean dev accuracy of the chosen labels when cross-validation chooses among each set",
        "of sources (the same stored CV accuracies, ties to the earlier source, one example per",
        "class by the binomial test), over every draw and with each data set left out in turn",
        "(bold: the best set without that data set). The shipped `DEFAULT_SOURCES` is the set",
        "with the best mean over every draw.",
        "",
        *rule_screen(results),
        "",
        "## Draws where cross-validation's choice is a point or more below the oracle",
        "",
        "With one example per class there is no CV accuracy (-): the binomial test chose.",
        "",
        *misses(results),
        "",
    ]
    TABLE.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {TABLE} from {len(results)} screens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
