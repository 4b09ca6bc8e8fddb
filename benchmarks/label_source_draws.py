"""How often the label-source rule drops the FM's prior wrongly, over many labeled draws.

``benchmarks/LABEL_SOURCE.md`` scores the choice on three draws per data set and k; this
one draws 8 labeled sets of 1-4 per class from each domain's pool (its true labels) and
scores the labels each refined source writes on the whole pool, beside which one the rules
would pick:

- ``plain CV``: the best cross-validation accuracy (ties to ``refined``), the rule before
  the sign test;
- ``shipped``: ``zmdevice.label_source.choose`` (the sign test guards an FM above chance);
- a grid of the two tests' levels (the sign test's, and the FM-above-chance level under
  which it is asked for), from the same stored counts, to show what the shipped
  ``PRIOR_SIGNIFICANCE`` was chosen against;
- ``oracle``: the better of the two per draw (the ceiling, not a rule).

With one example per class cross-validation scores nothing and every rule is the binomial
test (module doc of ``zmdevice.label_source``). The pool's true labels are the data's
unlabeled split: no test split is read.

Usage (one core, one thread; a minute or two a domain after its FM pass)::

    python examples/build_datasets.py --out /tmp/loopdata --only text-pos4 --max-unlabeled 3000
    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/label_source_draws.py \\
        --data /tmp/loopdata --domains text text-verbs text-nouns25 text-pos4 digits images

``--imbalanced`` runs only the draws of unequal class counts (``run_imbalanced``: the
labels with the classes balanced, as shipped, against the raw counts).

Writes ``benchmarks/results/label-source-draws.json`` (domains of earlier runs kept) and
``benchmarks/LABEL_SOURCE_DRAWS.md``; ``--page`` rewrites the page from the JSON only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_JSON = ROOT / "benchmarks" / "results" / "label-source-draws.json"
OUT_PAGE = ROOT / "benchmarks" / "LABEL_SOURCE_DRAWS.md"
DRAWS = 8
PER_CLASS = (1, 2, 3, 4)
IMAGE_DOMAINS = ("digits", "images")
"""Labeled by ``efficientnet-lite0`` (the benchmark's image FM); the others by MiniLM."""
LEVELS = (0.05, 0.1, 0.2)
"""The grid of both tests' levels the page compares (1.0 for the FM level: always ask)."""


def pool_evidence(folder: Path, teacher: str):
    """(Evidence of the pool with no labeled examples yet, true class ids [N], class names)."""
    from zmdevice.classes import load_classes
    from zmdevice.curation.fm_space import fm_outputs
    from zmdevice.data import open_dataset

    table = folder / "unlabeled.csv"
    dataset = open_dataset(table if table.exists() else folder / "unlabeled")
    classes = load_classes(str(folder / "classes.toml"))
    features, probs = fm_outputs(dataset, teacher, classes)
    with open(folder / "unlabeled_gold.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    key = "id" if "id" in rows[0] else "path"
    gold = {row[key]: row["label"] for row in rows}
    names = list(classes.names)
    truth = np.array([names.index(gold[i]) for i in dataset.ids])
    return features, probs, truth, names


def run_domain(folder: Path) -> list[dict]:
    from zmdevice import label_source as ls

    teacher = "efficientnet-lite0" if folder.name in IMAGE_DOMAINS else "minilm"
    features, probs, truth, names = pool_evidence(folder, teacher)
    rows = []
    for k in PER_CLASS:
        for draw in range(DRAWS):
            rng = np.random.default_rng(100 * k + draw)
            members = [np.flatnonzero(truth == c) for c in range(len(names))]
            picked = np.concatenate([rng.choice(m, k, replace=False) for m in members])
            evidence = ls.Evidence(features, probs, features[picked], truth[picked], probs[picked])
            graph = ls.data_graph(evidence)
            decision = ls.choose(evidence, ls.REFINED, graph)
            pool = {}
            for name in ls.REFINED:
                labels, _ = ls.make_labels(name, evidence, None, graph)
                pool[name] = float((labels.argmax(1) == truth).mean())
            cv = {n: decision["candidates"][n]["accuracy"] for n in ls.REFINED}
            rows.append({
                "k": k, "draw": draw, "pool_accuracy": pool, "cv_accuracy": cv,
                "shipped": decision["chosen"], "how": decision["how"],
                "fm_p_value": decision["p_value"], "prior_test": decision.get("prior_test"),
            })  # fmt: skip
        print(f"[draws] {folder.name} k{k}: {summary(rows, k)}", file=sys.stderr, flush=True)
    return rows


def run_imbalanced(folder: Path) -> list[dict]:
    """``DRAWS`` labeled sets of 4 per class on average in unequal counts (each class at
    least one, the rest dealt by Dirichlet(0.5) shares, as a person labeling what is put in
    front of them ends up with), labeled by ``choose``'s pick with the classes balanced
    (shipped: ``fewshot.class_balance``) and by the raw counts."""
    from zmdevice import fewshot
    from zmdevice import label_source as ls

    teacher = "efficientnet-lite0" if folder.name in IMAGE_DOMAINS else "minilm"
    features, probs, truth, names = pool_evidence(folder, teacher)
    shipped, rows = fewshot.class_balance, []
    for draw in range(DRAWS):
        rng = np.random.default_rng(500 + draw)
        counts = 1 + rng.multinomial(3 * len(names), rng.dirichlet(np.full(len(names), 0.5)))
        members = [np.flatnonzero(truth == c) for c in range(len(names))]
        picked = np.concatenate(
            [
                rng.choice(m, min(k, len(m)), replace=False)
                for m, k in zip(members, counts, strict=True)
            ]
        )
        evidence = ls.Evidence(features, probs, features[picked], truth[picked], probs[picked])
        graph = ls.data_graph(evidence)
        row = {
            "draw": draw,
            "counts": np.bincount(truth[picked], minlength=len(names)).tolist(),
            "zero_shot_accuracy": float((probs.argmax(1) == truth).mean()),
        }
        for name, balance in (("balanced", shipped), ("raw counts", lambda *args: None)):
            fewshot.class_balance = balance
            try:
                decision = ls.choose(evidence, ls.REFINED, graph)
                labels, _ = ls.make_labels(decision["chosen"], evidence, None, graph)
            finally:
                fewshot.class_balance = shipped
            row[name] = {"chosen": decision["chosen"],
                         "pool_accuracy": float((labels.argmax(1) == truth).mean())}  # fmt: skip
        rows.append(row)
    return rows


def plain_cv(row: dict) -> str:
    """The choice by the higher CV accuracy alone (ties to refined); the binomial test's
    choice where nothing was scored."""
    cv = row["cv_accuracy"]
    if cv["refined"] is None:
        return row["shipped"]
    return "refined-no-prior" if cv["refined-no-prior"] > cv["refined"] else "refined"


def guarded(sign_level: float, fm_level: float):
    """The rule with the sign test at ``sign_level`` asked for when the FM's binomial
    p-value is below ``fm_level``."""

    def rule(row: dict) -> str:
        choice = plain_cv(row)
        if choice == "refined" or row["cv_accuracy"]["refined"] is None:
            return choice
        if row["fm_p_value"] >= fm_level:
            return choice
        return choice if row["prior_test"]["p_value"] < sign_level else "refined"

    return rule


def rules() -> dict:
    found = {"plain CV": plain_cv, "shipped": lambda row: row["shipped"]}
    for sign_level in LEVELS:
        for fm_level in (*LEVELS, 1.0):
            found[f"sign {sign_level} / FM {fm_level}"] = guarded(sign_level, fm_level)
    found["always refined"] = lambda row: "refined"
    found["oracle"] = lambda row: max(row["pool_accuracy"], key=row["pool_accuracy"].get)
    return found


def mean_accuracy(rows: list[dict], rule) -> float:
    return 100 * float(np.mean([row["pool_accuracy"][rule(row)] for row in rows]))


def summary(rows: list[dict], k: int) -> str:
    chosen = [r for r in rows if r["k"] == k]
    return ", ".join(f"{n} {mean_accuracy(chosen, rule):.1f}" for n, rule in
                     [("plain CV", plain_cv), ("shipped", rules()["shipped"])])  # fmt: skip


def page(report: dict) -> str:
    domains = sorted(report)
    found = rules()
    shown = ["plain CV", "shipped", "always refined", "oracle"]
    lines = [
        "# Dropping the FM's prior: the label-source rule over many labeled draws",
        "",
        "Generated by `python benchmarks/label_source_draws.py` from",
        "`benchmarks/results/label-source-draws.json`; do not edit by hand. Accuracy in % of",
        "the labels each refined source writes on the domain's unlabeled pool (its true",
        f"labels; no test split read), mean over {DRAWS} labeled draws per k. `plain CV`: the",
        "higher cross-validation accuracy of refined / refined-no-prior; `shipped`:",
        "`label_source.choose` (the sign test guards an FM above chance); `oracle`: the",
        "better source per draw. k = 1: nothing to cross-validate, the binomial test decides",
        "for every rule.",
        "",
        "| domain | k | " + " | ".join(shown) + " | plain CV drops the prior | shipped drops it |",
        "|---|---|" + "---|" * (len(shown) + 2),
    ]
    for domain in domains:
        for k in PER_CLASS:
            rows = [r for r in report[domain]["rows"] if r["k"] == k]
            cells = [f"{mean_accuracy(rows, found[n]):.1f}" for n in shown]
            drops = [sum(found[n](r) == "refined-no-prior" for r in rows) for n in shown[:2]]
            counts = " | ".join(f"{d} of {len(rows)}" for d in drops)
            lines.append(f"| {domain} | {k} | " + " | ".join(cells) + f" | {counts} |")
    scored = {d: [r for r in report[d]["rows"] if r["k"] > 1] for d in domains}
    lines += [
        "",
        "## The tests' levels, over every draw with cross-validation (k = 2-4)",
        "",
        "Mean over the domains of each domain's mean; `without D`: the same with domain D",
        "left out. `sign a / FM b`: the sign test at level a is asked for when the FM's",
        "binomial p-value is below b (FM 1.0: always). Bold: the best rule of the column.",
        "",
        "| rule | every domain | " + " | ".join(f"without {d}" for d in domains) + " |",
        "|---|---|" + "---|" * len(domains),
    ]
    candidates = [n for n in found if n != "oracle"]
    columns = [domains] + [[d for d in domains if d != out] for out in domains]
    table = {
        n: [float(np.mean([mean_accuracy(scored[d], found[n]) for d in kept])) for kept in columns]
        for n in candidates
    }
    best = [max(table[n][i] for n in candidates) for i in range(len(columns))]
    for name in candidates:
        cells = [f"**{v:.2f}**" if v == best[i] else f"{v:.2f}" for i, v in enumerate(table[name])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += imbalanced_section(
        {d: report[d]["imbalanced"] for d in domains if "imbalanced" in report[d]}
    )
    environment = next(iter(report.values()))["environment"]
    lines += ["", f"Measured on {environment['cpu']}, zmdevice {environment['commit']}.", ""]
    return "\n".join(lines)


def imbalanced_section(runs: dict) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Unequal label counts per class",
        "",
        f"{DRAWS} labeled draws per domain of 4 per class on average in unequal counts (each",
        "class at least 1, the rest dealt by Dirichlet(0.5) shares); the labels `choose` picks",
        "with every class weighing the same in the probe and seeding the same mass in the",
        "spreading (`fewshot.class_balance`, shipped) and with the raw counts. Pool accuracy",
        "in %, mean over the draws; wins: draws where the balanced labels are higher.",
        "",
        "| domain | FM zero-shot | balanced | raw counts | wins | smallest / largest class, mean |",
        "|---|---|---|---|---|---|",
    ]
    for domain, rows in sorted(runs.items()):
        balanced = [r["balanced"]["pool_accuracy"] for r in rows]
        raw = [r["raw counts"]["pool_accuracy"] for r in rows]
        wins = sum(b > r for b, r in zip(balanced, raw, strict=True))
        small = np.mean([min(r["counts"]) for r in rows])
        large = np.mean([max(r["counts"]) for r in rows])
        zero_shot = rows[0]["zero_shot_accuracy"]
        lines.append(
            f"| {domain} | {100 * zero_shot:.1f} | {100 * np.mean(balanced):.1f} | "
            f"{100 * np.mean(raw):.1f} | {wins} of {len(rows)} | {small:.1f} / {large:.1f} |"
        )
    return lines


def environment() -> dict:
    import subprocess

    from zmdevice.precision import cpu_model

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"cpu": cpu_model(), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder of built domains")
    parser.add_argument("--domains", nargs="*", default=[])
    parser.add_argument("--page", action="store_true", help="rewrite the page from the JSON")
    parser.add_argument(
        "--imbalanced", action="store_true", help="only the draws of unequal class counts"
    )
    args = parser.parse_args(argv)
    report = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    if not args.page:
        torch.set_num_threads(1)
        for domain in args.domains:
            entry = report.setdefault(domain, {})
            if not args.imbalanced:
                entry["rows"] = run_domain(args.data / domain)
            entry["imbalanced"] = run_imbalanced(args.data / domain)
            entry["environment"] = environment()
            OUT_JSON.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    OUT_PAGE.write_text(page(report))
    print(f"wrote {OUT_PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
