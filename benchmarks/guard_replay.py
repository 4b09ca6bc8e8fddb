"""Choose the stage-2 collapse guard's rule on dev, by replaying it on dev runs' logs.

    python benchmarks/guard_replay.py      # writes benchmarks/results/guard-dev-replay.json

A dev training run (``paper.py run --split dev``) logs at every evaluation the guard's
label-free signals and, since ``paper.py`` passes the dev split as ``--test``, the dev
accuracy. A guard that does not fire changes nothing, so a run whose guard never fired (or
fired at the stage's last evaluation, after it was logged) holds the whole stage-2
trajectory: replaying another rule on it (the guard's own ``judge``: criteria, patience
and rollback target) gives where that rule would have fired,
the evaluation it would have rolled back to, and that evaluation's dev accuracy. Accuracies
are the logged ones (before the BatchNorm recalibration that the saved model gets), for every
rule alike; runs from before dev accuracy was logged say only whether a rule fires (and keep
their stored final accuracy when it does not). ``paper.py table`` renders the file.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zmdevice.training.guard import judge, new_memory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "benchmarks" / "work" / "runs"
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = RESULTS / "guard-dev-replay.json"
SHIPPED = {"collapse_agreement": True, "collapse_class_fraction": 0.5,
           "collapse_entropy_fraction": 0.5, "collapse_patience": 3}  # fmt: skip
"""The rule ``TrainConfig`` ships: the agreement floor its labels' accuracy sets, a class
losing half its predictions, entropy halved; three evaluations in a row."""
RULES = [
    {
        **SHIPPED,
        "collapse_agreement": agreement,
        "collapse_class_fraction": fraction,
        "collapse_patience": patience,
    }  # fmt: skip
    for agreement in (False, True)
    for fraction in (0.0, 0.25, 0.5)
    for patience in (1, 2, 3)
]


def trajectory(run: Path) -> dict | None:
    """A dev ZeroMatch run's stage-2 evaluations, or None when it cannot be replayed."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fired = [r["step"] for r in records if "collapse" in r]
    planned = tomllib.loads((run / "train_config.toml").read_text()).get("ssl_steps")
    if fired and fired[0] != planned:
        return None  # the guard fired early: the rest of the trajectory was never trained
    stage1 = [r for r in records if r["stage"] == "kd" and "heldout_agreement" in r]
    best = max(stage1, key=lambda r: r["heldout_agreement"], default=None)
    dev_at = {0: best.get("test_accuracy") if best else None}
    evaluations = []
    for record in records:
        if record["stage"] != "ssl":
            continue
        if "test_accuracy" in record:
            dev_at[record["step"]] = record["test_accuracy"]
        if "guard_class_entropy" in record:
            evaluations.append(record)
    if not evaluations:
        return None
    final = dev_at.get(evaluations[-1]["step"])
    stored = RESULTS / f"{run.name}.json"
    if final is None and stored.is_file():  # a run from before dev accuracy was logged
        final = json.loads(stored.read_text()).get("dev_accuracy")
    return {"evaluations": evaluations, "dev_at": dev_at, "final": final}


def replay(rule: dict, run: dict) -> dict:
    """Where ``rule`` fires on ``run`` and the dev accuracy of the weights it ends with."""
    config = SimpleNamespace(**rule)
    evaluations = run["evaluations"]
    first = evaluations[0]
    floor = first.get("guard_agreement_floor") if rule["collapse_agreement"] else None
    memory = new_memory(first, floor, mostly_right=bool(first.get("guard_labels_mostly_right")))
    for index, signals in enumerate(evaluations):
        last = index == len(evaluations) - 1
        _, act = judge(config, signals, memory, signals["step"], last)
        if act:
            back = memory.get("best_step")
            accuracy = run["dev_at"].get(back) if back is not None else run["final"]
            return {"fired_at": signals["step"], "rolled_back_to": back, "dev_accuracy": accuracy}
    return {"fired_at": None, "rolled_back_to": None, "dev_accuracy": run["final"]}


def main() -> int:
    runs = {}
    for folder in sorted(RUNS.glob("dev-*zeromatch*")):
        finished = (RESULTS / f"{folder.name}.json").is_file()  # not one still training
        run = trajectory(folder) if finished and (folder / "metrics.jsonl").is_file() else None
        if run is not None:
            runs[folder.name] = run
    if not runs:
        raise SystemExit(f"no replayable dev runs under {RUNS}")
    rules = []
    for rule in RULES:
        outcomes = {name: replay(rule, run) for name, run in runs.items()}
        rules.append({"rule": rule, "runs": outcomes})
    result = {
        "split": "dev",
        "what": "the collapse guard's rule replayed on dev runs' logged signals; accuracy "
        "is the logged dev accuracy of the weights each rule ends with",
        "shipped_before": SHIPPED,
        "runs": {
            name: {"final": run["final"], "stage1": run["dev_at"][0]} for name, run in runs.items()
        },
        "rules": rules,
    }
    tmp = OUTPUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(OUTPUT)
    print(f"wrote {OUTPUT} ({len(runs)} runs x {len(rules)} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
