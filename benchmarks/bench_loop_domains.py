"""The labeling loop on real data: does `suggest` pick better samples than chance, does
`check` find wrong labels, and what does fixing them give back?

Data: the benchmark's domains (``examples/build_datasets.py --only NAME``: a pool of
``--max-unlabeled`` samples with their true labels, and a test split): the WordNet text
pools with MiniLM as the FM, the image pools (``digits``, ``images``) with
EfficientNet-Lite0, the modality's default teachers. Each domain's pool is labeled
zero-shot once (``run_label``, what ``zmdevice label`` runs); the FM's features are computed
once by the first ``suggest`` and read from the feature cache after.

What is scored: the accuracy, on the pool's true labels, of the labels ``zmdevice label
--few-shot LABELED`` writes from the labels gathered so far (zero-shot, few-shot or refined,
as its cross-validation picks). Those are what ``zmdevice train`` learns from next, and the
benchmark's students end near their labels' accuracy (``benchmarks/RESULTS.md``). It is a
proxy for retraining the student every round, which costs 4-8 CPU-minutes a round here;
``--retrain-at 2 4`` also trains that student (``zmdevice train`` at its defaults) after
those rounds of chance, random and suggest and scores it on the domain's test split, the
pairs the target compares first (each student is kept in the work folder with its labeled
ids' digest: a rerun on the same ids skips it). ``--policies`` with no name re-scores
nothing: only the students missing are trained. Where the domain has a wider held-out split
(``test-extra``, from ``--max-extra-test``), every student is scored on it too, a kept one
the first time a run reaches it (200 test rows leave a student's accuracy a binomial error
of about 3.5 points, 2,000 rows 1.1); ``--kept-students-only`` trains none.

- **suggest against chance and random**, per seed: ``rounds`` rounds from no labels. Chance:
  one more true label per class each round, drawn at random (the protocol of the benchmark's
  labeled files: a draw that knows the classes). Random: C more pool samples each round,
  whatever their class (what a person without ``suggest`` does). Suggest: ``suggest --n C``
  (C classes) each round with the labels so far (cold start first, then uncertainty and
  disagreement), the person answering with the true label. All end with C x rounds labels.
- **check**, per seed: the chance draw's last round with 1 in ``flip_every`` labels moved to
  a random other class (at least one), ``--flip-draws`` times (a draw of 16-100 labels has
  2-12 flips: one draw a seed left the share found a coin toss); ``check`` (our ranking and
  cleanlab's) ranks them; found = flips among the top 2 x flips rows. Fixing (first draw):
  the flips in those rows set back to their true label, as the person reviewing them would;
  the labels' accuracy from the flipped, the fixed and the clean labels.

Usage (one core, one thread; about 10 minutes a domain, plus 4-8 minutes a student)::

    python examples/build_datasets.py --out /tmp/loopdata --only text-verbs --max-unlabeled 3000 \\
        --max-test 200 --max-dev 200 --max-extra-test 2000
    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/bench_loop_domains.py \\
        --data /tmp/loopdata --domains text text-verbs --seeds 0 1 2 [--retrain-at 2 4]

Writes ``benchmarks/loop-domains.json`` (each domain's rows are kept when another run adds
other domains), ``benchmarks/loop-domains.png`` and ``benchmarks/LOOP.md``; ``--plot``
redraws the two from the JSON only. ``--policies suggest`` re-scores only what it names,
keeping the stored rows of the others for the seeds run (after a change to ``suggest``: its
label runs are most of a domain's time); ``--seeds 1 2`` adds seeds to the stored ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_JSON = ROOT / "benchmarks" / "loop-domains.json"
OUT_PNG = ROOT / "benchmarks" / "loop-domains.png"
OUT_PAGE = ROOT / "benchmarks" / "LOOP.md"


def read_gold(folder: Path) -> tuple[list[str], str, dict[str, str], dict[str, str]]:
    """(pool ids in file order, the input column, id -> its text or absolute image path,
    id -> true label) of a domain's pool."""
    with open(folder / "unlabeled_gold.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    column = "path" if "path" in rows[0] else "text"
    # Absolute paths: the labeled tables are written outside the data folder.
    value = (lambda r: str(folder / r["path"])) if column == "path" else (lambda r: r["text"])
    return (
        [r["id"] for r in rows],
        column,
        {r["id"]: value(r) for r in rows},
        {r["id"]: r["label"] for r in rows},
    )


def labels_accuracy(path: Path, gold: dict) -> float:
    """Share of the pool whose label in the file (its argmax) is the true one."""
    from zmdevice.pseudolabels import read_pseudolabels

    stored = read_pseudolabels(path)
    predicted = stored.dense_probs().argmax(1)
    right = [stored.classes[p] == gold[i] for i, p in zip(stored.ids, predicted, strict=True)]
    return float(np.mean(right))


class Domain:
    """One domain's files, its zero-shot labels and the label runs made from it."""

    def __init__(self, folder: Path, work: Path):
        from zmdevice.modality import DEFAULT_TEACHERS

        self.folder, self.work = folder, work
        self.ids, self.column, self.inputs, self.gold = read_gold(folder)
        self.classes = sorted(set(self.gold.values()))
        image = self.column == "path"
        self.modality = "image" if image else "text"
        self.teacher = DEFAULT_TEACHERS[self.modality]
        self.data = folder / ("unlabeled" if image else "unlabeled.csv")
        self.test = folder / ("test" if image else "test.csv")
        # A wider held-out split (build_datasets.py --max-extra-test) where the folder has one:
        # 200 test rows leave each student's accuracy a binomial error of about 3.5 points.
        extra = folder / ("test-extra" if image else "test-extra.csv")
        self.extra_test = extra if extra.exists() else None
        self.zero_shot = work / "zero-shot.parquet"
        self.label(self.zero_shot)

    def write_labeled(self, path: Path, ids: list[str], labels: dict) -> Path:
        """A labeled table of ``ids`` (id, text or path, label) as a person would fill in."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", self.column, "label"])
            writer.writerows([i, self.inputs[i], labels[i]] for i in ids)
        return path

    def label(self, out: Path, few_shot: Path | None = None) -> dict:
        from zmdevice.config import LabelConfig
        from zmdevice.labeling.run import run_label

        out.unlink(missing_ok=True)
        # resume: a bench killed mid-label continues its chunks (same settings) next time.
        config = LabelConfig(
            data=self.data, classes=str(self.folder / "classes.toml"), teacher=self.teacher,
            out=out, few_shot=few_shot, resume=True,
        )  # fmt: skip
        return run_label(config)

    def accuracy_from(self, labeled: list[str], name: str, labels: dict | None = None) -> dict:
        """Accuracy of the labels `label --few-shot` writes from ``labeled`` (with ``labels``
        instead of the true ones where given) into ``few-shot-NAME.parquet``; zero-shot's
        with no labels."""
        from zmdevice.errors import UserError

        if not labeled:
            return {"accuracy": labels_accuracy(self.zero_shot, self.gold), "source": "zero-shot"}
        table = self.write_labeled(self.work / f"labeled-{name}.csv", labeled, labels or self.gold)
        out = self.work / f"few-shot-{name}.parquet"
        try:
            summary = self.label(out, few_shot=table)
        except UserError as error:  # e.g. one class only: the user keeps zero-shot labels
            zero = labels_accuracy(self.zero_shot, self.gold)
            return {"accuracy": zero, "source": "zero-shot", "refused": str(error)}
        source = summary.get("label_source") or "zero-shot"
        return {"accuracy": labels_accuracy(out, self.gold), "source": source, "file": str(out)}

    def kept_student(self, labeled: list[str], name: str) -> bool:
        """Whether student ``name`` is kept, trained on ``labeled``."""
        kept = self.work / f"{name}.json"
        return kept.is_file() and json.loads(kept.read_text()).get(
            "labeled_ids_sha256"
        ) == ids_digest(labeled)

    def retrain(self, labeled: list[str], pseudo_labels: Path, seed: int, name: str) -> dict:
        """``zmdevice train`` at its defaults on ``labeled`` (true labels) and the pool with
        ``pseudo_labels``, then ``zmdevice evaluate`` on the test split: what the person gets
        after the round. Kept in ``name``.json with the labeled ids' digest, so that a rerun
        on the same labels skips it (scoring a kept student on the wider test split where
        it has not been yet)."""
        from paper import zmdevice

        kept = self.work / f"{name}.json"
        out = self.work / name
        digest = ids_digest(labeled)
        if self.kept_student(labeled, name):
            stored = json.loads(kept.read_text())
            if self.extra_test and "extra_test_accuracy" not in stored and out.is_dir():
                stored.update(self.score_extra(out))
                kept.write_text(json.dumps(stored) + "\n")
            return stored
        table = self.write_labeled(self.work / f"{name}.csv", labeled, self.gold)
        started = time.perf_counter()
        zmdevice(
            "train", "--labeled", str(table), "--unlabeled", str(self.data),
            "--pseudo-labels", str(pseudo_labels), "--seed", str(seed), "--device", "cpu",
            "--out", str(out), "--overwrite",
        )  # fmt: skip
        seconds = time.perf_counter() - started
        # The resume checkpoint (weights and optimizer state, 350 MB a text student) is of no
        # use once trained: kept for the loop's 108 students it took most of 34 GB.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        evaluation = zmdevice("evaluate", str(out), "--data", str(self.test), "--device", "cpu")
        result = {
            "test_accuracy": evaluation["accuracy"],
            "train_seconds": round(seconds, 1),
            "labeled_ids_sha256": digest,
            **(self.score_extra(out) if self.extra_test else {}),
        }
        kept.write_text(json.dumps(result) + "\n")
        return result

    def score_extra(self, model: Path) -> dict:
        """The student's accuracy on the wider test split and the split's size."""
        from paper import zmdevice

        evaluation = zmdevice(
            "evaluate", str(model), "--data", str(self.extra_test), "--device", "cpu"
        )
        return {
            "extra_test_accuracy": evaluation["accuracy"],
            "extra_test_rows": evaluation["count"],
        }


def ids_digest(ids: list[str]) -> str:
    """The SHA-256 of a set of sample ids (order-free)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def chance_rounds(domain: Domain, rounds: int, seed: int) -> list[list[str]]:
    """The labeled ids after each round: one more random pool example per class."""
    rng = np.random.default_rng(seed)
    by_class = {c: [i for i in domain.ids if domain.gold[i] == c] for c in domain.classes}
    order = {c: list(rng.permutation(members)) for c, members in by_class.items()}
    return [[i for c in domain.classes for i in order[c][: r + 1]] for r in range(rounds)]


def random_rounds(domain: Domain, rounds: int, seed: int) -> list[list[str]]:
    """The labeled ids after each round: C more pool examples drawn at random, whatever
    their class (what a person without ``suggest`` does; chance's draw knows the classes)."""
    order = list(np.random.default_rng(2000 + seed).permutation(domain.ids))
    step = len(domain.classes)
    return [order[: step * (r + 1)] for r in range(rounds)]


def suggest_rounds(domain: Domain, rounds: int, seed: int) -> list[list[str]]:
    """The labeled ids after each round of ``suggest --n C`` answered with true labels."""
    from zmdevice.curation.settings import SuggestConfig
    from zmdevice.curation.suggest import run_suggest

    labeled: list[str] = []
    after = []
    for r in range(rounds):
        table = None
        if labeled:
            table = domain.write_labeled(
                domain.work / f"suggest-{seed}-{r}.csv", labeled, domain.gold
            )
        config = SuggestConfig(
            data=domain.data, pseudo_labels=domain.zero_shot, n=len(domain.classes),
            labeled=table, seed=seed, out=domain.work / f"suggested-{seed}-{r}.csv",
        )  # fmt: skip
        summary = run_suggest(config)
        labeled = labeled + [row["id"] for row in summary["rows"]]
        after.append(list(labeled))
    return after


def flip(
    ids: list[str], gold: dict, classes: list[str], every: int, seed: int, draw: int = 0
) -> dict:
    """Labels of ``ids`` with every ``every``-th (at least one) moved to another class,
    drawn for ``(seed, draw)``."""
    rng = np.random.default_rng((1000 + seed, draw))
    labels = {i: gold[i] for i in ids}
    chosen = rng.permutation(len(ids))[: max(1, len(ids) // every)]
    for k in chosen:
        others = [c for c in classes if c != gold[ids[k]]]
        labels[ids[k]] = others[rng.integers(len(others))]
    return labels


def check_round(domain: Domain, labeled: list[str], every: int, seed: int, draws: int) -> dict:
    """``check`` on ``draws`` flip draws of ``labeled`` (their found and flips summed); the
    labels' accuracy from the first draw's flipped and fixed labels (a label run each)."""
    from zmdevice.curation.check import run_check
    from zmdevice.curation.settings import CheckConfig

    result = {"labeled": len(labeled), "flips": 0, "draws": draws}
    for method in ("confident", "cleanlab"):
        result[method] = {"found": 0}
    for draw in range(draws):
        labels = flip(labeled, domain.gold, domain.classes, every, seed, draw)
        flipped = {i for i in labeled if labels[i] != domain.gold[i]}
        name = f"{seed}-{draw}"
        table = domain.write_labeled(domain.work / f"flipped-{name}.csv", labeled, labels)
        result["flips"] += len(flipped)
        for method in ("confident", "cleanlab"):
            config = CheckConfig(
                labeled=table, data=domain.data, pseudo_labels=domain.zero_shot, seed=seed,
                method=method, out=domain.work / f"check-{method}-{name}.csv",
            )  # fmt: skip
            rows = run_check(config)["rows"]
            top = {row["id"] for row in rows[: 2 * len(flipped)]}
            result[method]["found"] += len(top & flipped)
            if method == "confident" and draw == 0:
                fixed = {i: domain.gold[i] if i in top else labels[i] for i in labeled}
                result["fixed_accuracy"] = domain.accuracy_from(labeled, f"fixed-s{seed}", fixed)
        if draw == 0:
            result["flipped_accuracy"] = domain.accuracy_from(labeled, f"flipped-s{seed}", labels)
    return result


STUDENT_POLICIES = ("chance", "random", "suggest")
"""The draws whose students ``--retrain-at`` trains."""
POLICIES = ("chance", "random", "suggest", "check")
"""What a domain's seed scores; ``--policies`` re-scores some, keeping the others' rows."""


def run_domain(
    name: str,
    data: Path,
    work: Path,
    seeds: list[int],
    rounds: int,
    every: int,
    policies=POLICIES,
    flip_draws: int = 1,
    stored: dict | None = None,
) -> tuple[dict, dict]:
    """The domain's result without the retrained students, and per seed the labeled ids and
    label files of each round (what ``retrain_rounds`` trains from). Policies not in
    ``policies`` keep their rows of ``stored`` (the stored seeds); their ids are drawn
    again (cheap: no label run)."""  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    domain = Domain(data / name, work)
    print(
        f"[loop] {name}: {len(domain.ids)} pool samples, {len(domain.classes)} classes", flush=True
    )
    seeds_out, gathered = {}, {}
    for seed in seeds:
        kept = (stored or {}).get(str(seed), {})
        missing = [p for p in POLICIES if p not in policies and p not in kept]
        if missing:
            raise SystemExit(
                f"{name} seed {seed} has no stored {', '.join(missing)} rows: run them"
            )
        drawn_ids = {
            "chance": chance_rounds(domain, rounds, seed),
            "random": random_rounds(domain, rounds, seed),
            "suggest": suggest_rounds(domain, rounds, seed),
        }
        row = {"labels": [len(ids) for ids in drawn_ids["chance"]]}
        for policy, rounds_ids in drawn_ids.items():
            if policy in policies:
                row[policy] = [
                    domain.accuracy_from(ids, f"{policy}-s{seed}-r{r}")
                    for r, ids in enumerate(rounds_ids)
                ]
            else:
                row[policy] = kept[policy]
        for policy in ("random", "suggest"):
            row[f"{policy}_classes_covered"] = [
                len({domain.gold[i] for i in ids}) for ids in drawn_ids[policy]
            ]
        gathered[seed] = {
            policy: [(ids, row[policy][r].get("file")) for r, ids in enumerate(rounds_ids)]
            for policy, rounds_ids in drawn_ids.items()
        }
        chance = drawn_ids["chance"]
        if "check" in policies:
            row["check"] = check_round(domain, chance[-1], every, seed, flip_draws)
            row["check"]["clean_accuracy"] = row["chance"][-1]
        else:
            row["check"] = kept["check"]
        seeds_out[str(seed)] = row
        print(f"[loop] {name} seed {seed}: " + json.dumps(summarise_seed(row)), flush=True)
    result = {
        "pool": len(domain.ids),
        "classes": len(domain.classes),
        "modality": domain.modality,
        "zero_shot_accuracy": labels_accuracy(domain.zero_shot, domain.gold),
        "rounds": rounds,
        "flip_every": every,
        "seeds": seeds_out,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return result, {"domain": domain, "gathered": gathered}


def retrain_order(seeds: list[int], at: list[int]) -> list[tuple[str, int, int]]:
    """(policy, labels per class, seed) of every student to train, the pairs the target
    compares first (suggest at the fewest labels, random and chance at the most) so that a
    run cut short still answers it."""
    first = [("suggest", min(at)), ("random", max(at)), ("chance", max(at))]
    rest = [(p, k) for k in sorted(at) for p in STUDENT_POLICIES if (p, k) not in first]
    return [(p, k, seed) for p, k in first + rest for seed in seeds]


def retrain_rounds(result: dict, state: dict, at: list[int], save, kept_only: bool = False) -> None:
    """Train and score a student after the rounds ``at`` (labels per class), into
    ``result["seeds"][seed]["retrained"][policy][k]``, calling ``save`` after each;
    ``kept_only``: only the students kept from earlier runs (trains none)."""
    domain = state["domain"]
    for policy, k, seed in retrain_order(list(state["gathered"]), at):
        labeled, labels_file = state["gathered"][seed][policy][k - 1]
        if labels_file is None:  # label --few-shot refused (one class only): zero-shot labels
            labels_file = domain.zero_shot
        name = f"train-{policy}-k{k}-s{seed}"
        if kept_only and not domain.kept_student(labeled, name):
            continue
        trained = domain.retrain(labeled, Path(labels_file), seed, name)
        retrained = result["seeds"][str(seed)].setdefault("retrained", {})
        retrained.setdefault(policy, {})[str(k)] = trained
        print(f"[loop] retrained {policy} k{k} s{seed}: {trained}", flush=True)
        save()


def summarise_seed(row: dict) -> dict:
    check = row["check"]
    return {
        **{
            key: [round(100 * r["accuracy"], 1) for r in row[key]]
            for key in ("chance", "random", "suggest")
        },
        "flips found (ours, cleanlab)": [
            check["confident"]["found"],
            check["cleanlab"]["found"],
            check["flips"],
        ],  # fmt: skip
        "flipped / fixed / clean": [
            round(100 * check[k]["accuracy"], 1)
            for k in ("flipped_accuracy", "fixed_accuracy", "clean_accuracy")
        ],
    }


def plot(report: dict, path: Path) -> None:
    """Per domain: the written labels' accuracy on the pool by round (top row) and, where
    students were retrained, their test accuracy (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(report["domains"].items())
    with_students = any("retrained" in s for _, result in domains for s in result["seeds"].values())
    rows = 2 if with_students else 1
    figure, axes = plt.subplots(
        rows, len(domains), figsize=(4 * len(domains), 3.4 * rows), squeeze=False
    )
    colours = (("chance", "tab:grey"), ("random", "tab:green"), ("suggest", "tab:blue"))
    for column, (name, result) in enumerate(domains):
        axis = axes[0][column]
        seeds = list(result["seeds"].values())
        per_class = np.arange(1, result["rounds"] + 1)
        for key, colour in colours:
            if not all(key in s for s in seeds):  # runs before the random draw was added
                continue
            values = 100 * np.array([[r["accuracy"] for r in s[key]] for s in seeds])
            axis.plot(per_class, values.mean(0), marker="o", color=colour, label=key)
            axis.fill_between(per_class, values.min(0), values.max(0), color=colour, alpha=0.2)
        axis.axhline(100 * result["zero_shot_accuracy"], color="tab:red", ls=":", label="zero-shot")
        axis.set_title(f"{name} ({result['classes']} classes)")
        axis.set_xticks(per_class)
        if rows == 2:
            below = axes[1][column]
            for key, colour in colours:
                points = [(k, retrained(result, key, k)) for k in per_class]
                points = [(k, v) for k, v in points if v]
                if points:
                    ks = [k for k, _ in points]
                    below.errorbar(
                        ks, [np.mean(v) for _, v in points],
                        yerr=[[np.mean(v) - min(v) for _, v in points],
                              [max(v) - np.mean(v) for _, v in points]],
                        marker="s", color=colour, capsize=3, label=f"{key}: student",
                    )  # fmt: skip
            if not any(retrained(result, key, k) for key, _ in colours for k in per_class):
                below.text(0.5, 0.5, "no students trained", ha="center", transform=below.transAxes)
            below.set_xticks(per_class)
            below.set_xlabel("labels per class (C x round)")
        else:
            axis.set_xlabel("labels per class (C x round)")
    axes[0][0].set_ylabel("accuracy of the labels written (%)")
    axes[0][0].legend(fontsize=8)
    if rows == 2:
        axes[1][0].set_ylabel("student's test accuracy (%)")
        axes[1][0].legend(fontsize=8)
    figure.suptitle(
        "label --few-shot (top) and the retrained student (bottom) from suggested vs random "
        "labels; mean, band/bars min-max over the seeds",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(report: dict) -> str:
    """``benchmarks/LOOP.md``: per domain and round, chance against suggest (mean, min-max
    over the seeds), then check's finds and what fixing them gave back."""
    lines = [
        "# The labeling loop on real data (`benchmarks/bench_loop_domains.py`)",
        "",
        "Generated by `python benchmarks/bench_loop_domains.py --plot` from "
        "`benchmarks/loop-domains.json`; do not edit by hand. "
        f"CPU: {report.get('cpu', '?')}, {report.get('threads', '?')} thread(s).",
        "",
        "Accuracy (%) on each domain's pool of the labels `zmdevice label --few-shot` writes "
        "from the labels gathered so far (a proxy for retraining the student every round: the "
        "students end near their labels' accuracy). Chance: one more random true label per "
        "class each round (a draw that knows the classes, as the benchmark's labeled files are "
        "drawn); random: C more pool samples at random, whatever their class (what a person "
        "without `suggest` does); suggest: `suggest --n C` answered with the true labels. Mean "
        "(min-max) over the seeds; classes covered per seed; the plot is "
        "[`loop-domains.png`](loop-domains.png).",
        "",
        "| domain | classes | zero-shot | labels/class | chance | random | suggest | classes "
        "covered (random; suggest) | sources chosen (chance; random; suggest) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    policies = ("chance", "random", "suggest")
    for name, result in sorted(report["domains"].items()):
        seeds = list(result["seeds"].values())
        for r in range(result["rounds"]):
            cells = []
            for key in policies:
                values = [100 * s[key][r]["accuracy"] for s in seeds if key in s]
                cells.append(
                    f"{np.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
                    if values
                    else "-"
                )
            covered = "; ".join(
                "/".join(str(s[f"{key}_classes_covered"][r]) for s in seeds if key in s) or "-"
                for key in ("random", "suggest")
            )
            sources = "; ".join(
                "/".join(s[key][r]["source"] for s in seeds if key in s) or "-" for key in policies
            )
            zero = f"{100 * result['zero_shot_accuracy']:.1f}" if r == 0 else ""
            lines.append(
                f"| {name} | {result['classes'] if r == 0 else ''} | {zero} | {r + 1} | "
                f"{' | '.join(cells)} | {covered} | {sources} |"
            )
    lines += [
        "",
        "Target on the labels written: suggest with half the labels against 4 per class:",
        "",
    ]
    for name, result in sorted(report["domains"].items()):
        seeds = list(result["seeds"].values())
        most = result["rounds"]
        half = most // 2
        ours = [100 * s["suggest"][half - 1]["accuracy"] for s in seeds]
        parts = []
        for key in ("chance", "random"):
            theirs = [100 * s[key][most - 1]["accuracy"] for s in seeds if key in s]
            if theirs:
                spread = max(theirs) - min(theirs)
                parts.append(
                    f"{key} {np.mean(theirs):.1f} ({np.mean(ours) - np.mean(theirs):+.1f}; its "
                    f"seed spread {spread:.1f})"
                )
        lines.append(
            f"- {name}: suggest at {half}/class {np.mean(ours):.1f} against, at {most}/class, "
            + ", ".join(parts)
        )
    lines += [
        "",
        f"`check` on the chance draw's last round with 1 in "
        f"{next(iter(report['domains'].values()))['flip_every']} labels moved to another "
        "class, in as many draws per seed as the `draws` column says: flips among the top 2 x "
        "flips rows (ours; cleanlab's `find_label_issues` ranking), summed over the seeds and "
        "draws, and the labels' accuracy (%) from the first draw's flipped labels, after "
        "fixing the flips in its top rows, and from the clean labels (mean over the seeds).",
        "",
        "| domain | labeled | draws | flips | found (ours) | found (cleanlab) | flipped | fixed "
        "| clean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in sorted(report["domains"].items()):
        checks = [s["check"] for s in result["seeds"].values()]
        flips = sum(c["flips"] for c in checks)
        ours = sum(c["confident"]["found"] for c in checks)
        theirs = sum(c["cleanlab"]["found"] for c in checks)
        accuracy = {k: np.mean([100 * c[k]["accuracy"] for c in checks])
                    for k in ("flipped_accuracy", "fixed_accuracy", "clean_accuracy")}  # fmt: skip
        lines.append(
            f"| {name} | {checks[0]['labeled']} | {checks[0].get('draws', 1)} | {flips} | "
            f"{ours} ({100 * ours / flips:.0f}%) | "
            f"{theirs} ({100 * theirs / flips:.0f}%) | {accuracy['flipped_accuracy']:.1f} | "
            f"{accuracy['fixed_accuracy']:.1f} | {accuracy['clean_accuracy']:.1f} |"
        )
    return "\n".join(lines + retrained_table(report)) + "\n"


SPLITS = {
    "test_accuracy": "the domain's test split",
    "extra_test_accuracy": "the domain's wider test split (`test-extra`, built with "
    "`--max-extra-test`; the domains without one are left out)",
}
"""The accuracies a student is scored by: the JSON key and the split's description."""


def retrained(result: dict, policy: str, k: int, key: str = "test_accuracy") -> list[float]:
    """Accuracies (%, ``key``) of the students trained after ``k`` labels per class, per
    seed (the seeds that have one)."""
    rows = [s.get("retrained", {}).get(policy, {}).get(str(k)) for s in result["seeds"].values()]
    return [100 * r[key] for r in rows if r and key in r]


def retrained_table(report: dict) -> list[str]:
    """The students trained after the rounds, and the target: suggest at half the labels
    against random and chance at all of them; once per split the students were scored on."""
    domains = {
        name: result
        for name, result in sorted(report["domains"].items())
        if any("retrained" in s for s in result["seeds"].values())
    }
    lines = []
    for key in SPLITS:
        lines += students_table(domains, key)
    return lines


def students_table(domains: dict, key: str) -> list[str]:
    """``retrained_table``'s table and verdicts of the accuracies ``key``."""
    domains = {
        name: result
        for name, result in domains.items()
        if any(retrained(result, p, k, key) for p in STUDENT_POLICIES for k in range(1, 9))
    }
    if not domains:
        return []
    rows = {
        next(
            r[key.replace("accuracy", "rows")]
            for s in result["seeds"].values()
            for p in s.get("retrained", {}).values()
            for r in p.values()
            if key.replace("accuracy", "rows") in r
        )
        for result in domains.values()
        if key != "test_accuracy"
    }
    size = f" ({' / '.join(f'{r:,}' for r in sorted(rows))} rows)" if rows else ""
    lines = [
        "",
        "## Students retrained after the rounds"
        + ("" if key == "test_accuracy" else ", on the wider test split"),
        "",
        "Test accuracy (%) of `zmdevice train` at its defaults (the modality's default student, "
        "steps and flow) on the labels gathered so far and the pool with the labels `label "
        "--few-shot` wrote from them, scored by `zmdevice evaluate` on "
        f"{SPLITS[key]}{size}. "
        "Mean (per seed), and the minutes one training took (mean).",
        "",
        "| domain | labels/class | chance | random | suggest | suggest - random | "
        "suggest - chance | train minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, result in domains.items():
        ks = sorted(
            {int(k) for s in result["seeds"].values() for p in s.get("retrained", {}).values()
             for k in p}
        )  # fmt: skip
        for k in ks:
            cells = {p: retrained(result, p, k, key) for p in STUDENT_POLICIES}
            text = {
                p: f"{np.mean(v):.1f} ({' / '.join(f'{x:.1f}' for x in v)})" if v else "-"
                for p, v in cells.items()
            }

            def gap(rival: str, cells=cells) -> str:
                if not len(cells[rival]) == len(cells["suggest"]) > 0:
                    return "-"
                return f"{np.mean(cells['suggest']) - np.mean(cells[rival]):+.1f}"

            minutes = [
                r["train_seconds"] / 60
                for s in result["seeds"].values()
                for p in s.get("retrained", {}).values()
                for kk, r in p.items()
                if kk == str(k)
            ]
            lines.append(
                f"| {name} | {k} | {text['chance']} | {text['random']} | {text['suggest']} | "
                f"{gap('random')} | {gap('chance')} | {np.mean(minutes):.1f} |"
            )
        if len(ks) >= 2:
            fewest, most = ks[0], ks[-1]
            ours = retrained(result, "suggest", fewest, key)
            for rival in ("random", "chance"):
                theirs = retrained(result, rival, most, key)
                if not (ours and theirs):
                    continue
                spread = max(theirs) - min(theirs)
                verdict = (
                    "reached"
                    if np.mean(ours) >= np.mean(theirs)
                    else f"inside {rival}'s seed spread"
                    if np.mean(theirs) - np.mean(ours) <= spread
                    else "not reached"
                )
                verdicts.append(
                    f"- {name}: suggest with {fewest}/class {np.mean(ours):.1f} against {rival} "
                    f"with {most}/class {np.mean(theirs):.1f} (seed spread {spread:.1f}): "
                    f"{verdict}."
                )
    if verdicts:
        lines += ["", "Target (suggest's students with half the labels match random's, the "
                  "issue's bar; chance's, which knows the classes, too):", ""]  # fmt: skip
        lines += verdicts
    return lines


def save_domain(path: Path, name: str, result: dict, report: dict) -> dict:
    """Write ``result`` as domain ``name`` into the JSON, keeping the domains another run
    (on the other core) wrote since this one started; returns the report written."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = json.loads(path.read_text()) if path.is_file() else {"domains": {}}
        stored.update({k: v for k, v in report.items() if k != "domains"})
        stored["domains"][name] = result
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(stored, indent=1) + "\n")
        os.replace(temporary, path)
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "work" / "data")
    parser.add_argument("--domains", nargs="*", default=["text", "text-verbs"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flip-every", type=int, default=8)
    parser.add_argument(
        "--flip-draws", type=int, default=10,
        help="check's flip draws per seed (found and flips summed over them; the accuracies "
        "from the first)",
    )  # fmt: skip
    parser.add_argument(
        "--retrain-at", nargs="*", type=int, default=[],
        help="labels per class after which a student is trained at the defaults and scored "
        "on the test split (e.g. 2 4)",
    )  # fmt: skip
    parser.add_argument(
        "--kept-students-only", action="store_true",
        help="with --retrain-at: train no student, only score the kept ones (on the wider "
        "test split where they lack it)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "loop")
    parser.add_argument("--json", type=Path, default=OUT_JSON)
    parser.add_argument("--png", type=Path, default=OUT_PNG)
    parser.add_argument("--page", type=Path, default=OUT_PAGE)
    parser.add_argument("--plot", action="store_true", help="redraw the PNG from the JSON only")
    parser.add_argument(
        "--policies", nargs="*", default=list(POLICIES), choices=POLICIES,
        help="what to score again (the others keep their stored rows), e.g. suggest",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text()) if args.json.is_file() else {"domains": {}}
    if not args.plot:
        sys.path.insert(0, str(ROOT))  # this checkout's zmdevice
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        report["cpu"] = (
            Path("/proc/cpuinfo")
            .read_text()
            .split("model name")[1]
            .split("\n")[0]
            .split(":", 1)[1]
            .strip()
        )
        report["threads"] = torch.get_num_threads()
        sys.path.insert(0, str(ROOT / "benchmarks"))  # paper.zmdevice runs the CLI

        for name in args.domains:
            previous = report["domains"].get(name, {})
            result, state = run_domain(
                name, args.data, args.work / name, args.seeds, args.rounds, args.flip_every,
                args.policies, stored=previous.get("seeds"), flip_draws=args.flip_draws,
            )  # fmt: skip
            for seed, row in previous.get("seeds", {}).items():
                if seed not in result["seeds"]:  # a run of other seeds adds to these
                    result["seeds"][seed] = row
                elif "retrained" in row:  # its students stand until retrained below
                    result["seeds"][seed]["retrained"] = row["retrained"]
            result["seeds"] = dict(sorted(result["seeds"].items(), key=lambda kv: int(kv[0])))
            report = save_domain(args.json, name, result, report)
            if args.retrain_at:
                retrain_rounds(
                    result, state, args.retrain_at,
                    lambda: save_domain(args.json, name, result, report),  # noqa: B023
                    args.kept_students_only,
                )  # fmt: skip
                report = save_domain(args.json, name, result, report)
    plot(report, args.png)
    args.page.write_text(table(report), encoding="utf-8")
    print(f"[loop] wrote {args.json}, {args.png} and {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
