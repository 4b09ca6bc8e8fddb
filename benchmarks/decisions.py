"""Defaults chosen across domains, from the stored dev runs (``paper.py table`` renders this).

A decision is a setting with a few options (stage 2's last weights or a weight average, ...),
screened as pairs of benchmark methods on the dev split of several data sets. Every domain
weighs the same: its options' dev accuracy is the mean over its screened labels/class settings
of the mean over the seeds all options share (each seed is its own labeled draw, paired across
the options). The choice is the option with the highest mean over the domains; the check
beside it says whether leaving any one domain out, or reading any one seed alone, would have
chosen differently.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from zmdevice.config import TrainConfig


@dataclass(frozen=True)
class Cell:
    """One screened setting: a data set at ``labels_per_class``, one method per option."""

    dataset: str
    labels_per_class: int
    methods: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    question: str
    options: tuple[str, ...]
    setting: str
    """The ``TrainConfig`` field decided, ..."""
    values: tuple
    """... and its value under each option: what ships is read from the field's default."""
    cells: tuple[Cell, ...]

    @property
    def shipped(self) -> int:
        default = {f.name: f.default for f in fields(TrainConfig)}[self.setting]
        return self.values.index(default)


def _cells(pairs: dict[tuple[str, int], tuple[str, ...]]) -> tuple[Cell, ...]:
    return tuple(Cell(dataset, k, methods) for (dataset, k), methods in pairs.items())


DECISIONS = (
    Decision(
        "Stage 2 ends on its last weights or on a moving average of its weights started at "
        "stage 1's (`ssl_weight_average`, horizon 1 = all of stage 2's steps)",
        ("last weights (the paper)", "weight average"),
        setting="ssl_weight_average",
        values=(0.0, 1.0),
        cells=_cells(
            {
                ("text", 4): ("zeromatch-rf", "zeromatch-rf-avg1"),
                ("text", 1): ("zeromatch-rf", "zeromatch-rf-avg1"),
                ("images", 4): ("zeromatch-rf-effl0-64", "zeromatch-rf-effl0-64-avg1"),
                ("images", 1): ("zeromatch-rf", "zeromatch-rf-avg1"),
                ("images-fm224", 4): ("zeromatch-rf-effl0-64", "zeromatch-rf-effl0-64-avg1"),
                ("digits", 4): ("zeromatch-rf", "zeromatch-rf-avg1"),
                ("digits", 1): ("zeromatch-rf", "zeromatch-rf-avg1"),
                ("text-verbs", 4): ("zeromatch-auto", "zeromatch-auto-avg1"),
                ("text-nouns25", 4): ("zeromatch-auto", "zeromatch-auto-avg1"),
                ("text-pos4", 4): ("zeromatch-auto", "zeromatch-auto-avg1"),
            }
        ),
    ),
    Decision(
        "Stage 2's peak learning rates: stage 1's, or a quarter of them (`ssl_lr_scale`)",
        ("stage 1's rates", "a quarter"),
        setting="ssl_lr_scale",
        values=(1.0, 0.25),
        cells=_cells(
            {
                ("images", 4): ("zeromatch-rf", "zeromatch-rf-lr25"),
                ("images", 1): ("zeromatch-rf", "zeromatch-rf-lr25"),
                ("text", 1): ("zeromatch-rf", "zeromatch-rf-lr25"),
            }
        ),
    ),
    Decision(
        "The KD head ramps up from 0 (the paper's alpha schedule) or weighs 4x from stage 2's "
        "first step (`alpha`; with `lambda_p` 4)",
        ("ramp", "4x from the start"),
        setting="alpha",
        values=("ramp", "constant"),
        cells=_cells({("images", 1): ("zeromatch-rf", "zeromatch-rf-anchor")}),
    ),
    Decision(
        "Stage 1 distils hard labels (the argmax) or the labels' probabilities (`soft_labels`)",
        ("hard", "soft"),
        setting="soft_labels",
        values=(False, True),
        cells=_cells(
            {
                ("images", 4): ("zeromatch-rf", "zeromatch-rf-soft"),
                ("text", 4): ("zeromatch-rf", "zeromatch-rf-soft"),
            }
        ),
    ),
)
"""Every default screened on more than one setting; the collapse guard's rule has its own
replay (``benchmarks/guard_replay.py``), the label source its own page (LABEL_SOURCE.md)."""


@dataclass(frozen=True)
class Screen:
    """A decision's dev evidence: per domain, each option's accuracy and the seeds behind it."""

    decision: Decision
    domains: dict[str, list[float]]
    """Domain -> each option's dev accuracy (mean over its cells)."""
    seeds: dict[str, dict[int, list[float]]]
    """Domain -> seed -> each option's accuracy on that seed (mean over the cells it has)."""
    detail: dict[str, str]
    """Domain -> which cells, with their shared seeds, e.g. ``4: 3 seeds, 1: 3 seeds``."""
    missing: list[str]
    """Cells without a shared seed, e.g. ``digits at 1``."""

    def choice(self, without: str | None = None, seed: int | None = None) -> int | None:
        """The option with the highest mean over the domains (ties: the shipped one), leaving
        ``without`` out, or reading ``seed`` alone."""
        if seed is None:
            rows = [v for domain, v in self.domains.items() if domain != without]
        else:
            rows = [by_seed[seed] for by_seed in self.seeds.values() if seed in by_seed]
        if not rows:
            return None
        means = [sum(row[i] for row in rows) / len(rows) for i in range(len(rows[0]))]
        best = max(means)
        if means[self.decision.shipped] == best:
            return self.decision.shipped
        return means.index(best)


def _dev_seeds(results: list[dict], cell: Cell) -> dict[int, list[float]]:
    """Seed -> each option's dev accuracy, for the seeds every option of ``cell`` has."""
    per_option = [
        {
            r["seed"]: r["dev_accuracy"]
            for r in results
            if r.get("split") == "dev"
            and r["dataset"] == cell.dataset
            and r.get("labels_per_class") == cell.labels_per_class
            and r["method"] == method
        }
        for method in cell.methods
    ]
    shared = set.intersection(*(set(values) for values in per_option))
    return {seed: [values[seed] for values in per_option] for seed in sorted(shared)}


def _mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def screen(decision: Decision, results: list[dict]) -> Screen:
    cells: dict[str, list[dict[int, list[float]]]] = {}
    detail: dict[str, list[str]] = {}
    missing = []
    for cell in decision.cells:
        seeds = _dev_seeds(results, cell)
        if not seeds:
            missing.append(f"{cell.dataset} at {cell.labels_per_class}")
            continue
        cells.setdefault(cell.dataset, []).append(seeds)
        detail.setdefault(cell.dataset, []).append(
            f"{cell.labels_per_class}: {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        )
    domains = {
        domain: _mean_rows([_mean_rows(list(seeds.values())) for seeds in group])
        for domain, group in cells.items()
    }
    by_seed = {
        domain: {
            seed: _mean_rows([seeds[seed] for seeds in group if seed in seeds])
            for seed in sorted({s for seeds in group for s in seeds})
        }
        for domain, group in cells.items()
    }
    return Screen(decision, domains, by_seed, {d: ", ".join(v) for d, v in detail.items()}, missing)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def render(found: Screen) -> list[str]:
    """A decision's table (per domain, the mean, leaving each domain out) and its verdict."""
    decision = found.decision
    options = decision.options
    if not found.domains:
        return []
    chosen = found.choice()
    several = len(found.domains) > 1
    lines = [
        f"**{decision.question}.** Shipped: {options[decision.shipped]}.",
        "",
        f"| domain | labels/class: seeds | {' | '.join(options)} | "
        "difference | without this domain, the mean picks (difference) |",
        "|---|---|" + "---|" * len(options) + "---|---|",
    ]
    for domain, values in found.domains.items():
        alone = found.choice(without=domain) if several else None
        picks = "-" if alone is None else options[alone]
        if alone is not None:
            others = _mean_rows([v for d, v in found.domains.items() if d != domain])
            picks += f" ({100 * (others[-1] - others[0]):+.2f})"
        if alone is not None and alone != chosen:
            picks = f"**{picks}** (differs)"
        lines.append(
            f"| {domain} | {found.detail[domain]} | {' | '.join(map(_percent, values))} | "
            f"{100 * (values[-1] - values[0]):+.1f} | {picks} |"
        )
    mean = _mean_rows(list(found.domains.values()))
    lines.append(
        f"| **mean of {len(found.domains)}** | | {' | '.join(map(_percent, mean))} | "
        f"{100 * (mean[-1] - mean[0]):+.1f} | |"
    )
    several = len(found.domains) > 1
    flips = [d for d in found.domains if several and found.choice(without=d) != chosen]
    seeds = sorted({s for by_seed in found.seeds.values() for s in by_seed})
    per_seed = {seed: found.choice(seed=seed) for seed in seeds}
    wins = sum(values[-1] > values[0] for values in found.domains.values())
    verdict = [
        f"The mean picks **{options[chosen]}**"
        + (" (the shipped option)" if chosen == decision.shipped else " (not what ships)"),
        f"{options[-1]} is higher on {wins} of {len(found.domains)} domains",
    ]
    if not several:
        verdict.append("one domain only, so no leave-one-out check")
    elif flips:
        verdict.append("leaving out " + ", ".join(flips) + " would change the choice")
    else:
        verdict.append("leaving out any one domain gives the same choice")
    verdict.append(
        "per seed: "
        + ", ".join(f"seed {seed} picks {options[choice]}" for seed, choice in per_seed.items())
        + (
            " (the same)"
            if len(set(per_seed.values())) == 1
            else " (the choice flips between seeds)"
        )
    )
    if found.missing:
        verdict.append("not yet screened: " + ", ".join(found.missing))
    return [*lines, "", "; ".join(verdict) + ".", ""]


def section(results: list[dict]) -> list[str]:
    """RESULTS.md's section: every decision of ``DECISIONS`` that has dev runs."""
    body = [line for decision in DECISIONS for line in render(screen(decision, results))]
    if not body:
        return []
    return [
        "## Defaults chosen across domains, on dev",
        "",
        "Each domain weighs the same: its dev accuracy per option is the mean over the "
        "screened labels/class settings of the mean over the seeds every option shares (each "
        "seed its own labeled draw); the difference is the second option's minus the first's. "
        "The choice is the highest mean over the domains (a tie "
        "keeps what ships); the last column and the line below say whether leaving one "
        "domain out, or reading one seed alone, would have chosen otherwise.",
        "",
        *body,
    ]
