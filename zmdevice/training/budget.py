"""``--time-budget``: plan the stages' steps from measured step times, stop on time.

Planning happens once, before the first step, because the learning-rate warmup and cosine,
and the alpha ramp of stage 2 are functions of a stage's total steps. A probe trains a
throwaway copy of the student for ``PROBE_STEPS`` steps of each stage kind (stage-1 KD and
stage-2 SSL steps cost differently) and times the steps after ``PROBE_WARM_STEPS`` warm
ones, then times one evaluation and one batch of the BatchNorm recalibration that precedes
saving (image students), which over the whole unlabeled pool can outlast a short budget's
training. Every random generator is restored afterwards, so a budget
run trains exactly like a run given the planned steps.

The plan splits the time left, minus ``RESERVE_SHARE`` of the budget, the recalibration and
two evaluations' time (final test, saving), between the stages in the ratio of
``kd_steps : ssl_steps`` (the modality defaults unless set), counting the periodic
evaluations. The planned steps replace ``kd_steps`` and ``ssl_steps`` in the run's settings
(``train_config.toml``, checkpoints), and the plan is stored in checkpoints: ``--resume``
continues it with the budget's remaining time and never plans again. If the steps run slower
than measured, the run stops once only the reserve is left, and still finishes (model
selection, BatchNorm recalibration, test, student, report).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

from zmdevice.errors import UserError
from zmdevice.training.loop import (
    Setup,
    begin_stage,
    evaluate_now,
    new_state,
    recalibrate,
    recalibration_batches,
)
from zmdevice.training.stages import StagePlan, StepModel, plan_stages

PROBE_WARM_STEPS = 2
"""Probe steps not timed (first calls, caches, allocator)."""
PROBE_TIMED_STEPS = 4
"""Timed probe steps per stage kind (a multiple of ``loop.LOOKAHEAD_STEPS``)."""
RESERVE_SHARE = 0.05
"""Share of the budget the plan leaves free for what the probe does not measure
(checkpoints, logging, finishing, steps slower than measured)."""
FINISH_SHARE = 0.02
"""Share of the budget (besides two evaluations) left when a run stops on time, for
finishing: BatchNorm recalibration, final test, saving, report and curves."""


MAX_MINUTES = 7 * 24 * 60
"""The longest budget planned (7 days): beyond it the plan's step counts are meaningless
(a typo such as 1e9 minutes would plan 13-digit steps and train on)."""


def check_time_budget(minutes: float | None) -> None:
    """Refuse a budget that is not a finite number of minutes up to ``MAX_MINUTES``; called
    before anything is built or deleted."""
    if minutes is None:
        return
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_MINUTES):
        raise UserError(
            f"--time-budget {minutes:g}: give a number of minutes above 0 and at most "
            f"{MAX_MINUTES} (7 days)"
        )


@dataclasses.dataclass
class Budget:
    """A planned run's clock: the budget, when it began and what the probe measured."""

    seconds: float
    clock: Callable[[], float]
    started: float
    """``clock()`` when the budget began (moved back by the time used before a resume)."""
    plan: dict
    """Planned steps per stage kind, measured seconds per step and per evaluation."""

    def used(self) -> float:
        return self.clock() - self.started

    def reserve(self) -> float:
        """Seconds kept for finishing when the run stops on time."""
        finishing = 2 * self.plan["eval_seconds"] + self.plan.get("recalibration_seconds", 0.0)
        return finishing + FINISH_SHARE * self.seconds

    def out_of_time(self, setup: Setup, state: dict, plan: StagePlan) -> bool:
        """True (logged, and the run marked stopped) once only the reserve is left."""
        if self.seconds - self.used() > self.reserve():
            return False
        setup.log.write(state, plan, {"time_budget_stop": True})
        state["stopped"] = "time budget"
        return True

    def record(self) -> dict:
        """What checkpoints keep: the plan and the time used so far."""
        return {**self.plan, "used_seconds": round(self.used(), 3)}


def plan_budget(setup: Setup, clock: Callable[[], float], started: float) -> None:
    """Measure, plan, and fix the planned steps in ``setup`` (a fresh run)."""
    config = setup.config
    seconds = 60.0 * config.time_budget
    measured = measure(setup, clock)
    left = seconds * (1 - RESERVE_SHARE) - (clock() - started)
    eval_seconds = measured["eval_seconds"]
    evals_per_step = 1 / config.eval_every if config.eval_every else 0.0
    # Steps scale with x: stage i runs x * ratio_i steps and one evaluation per eval_every
    # steps plus one at its end; two more evaluations' time is the finishing reserve.
    per_x = sum(
        plan.steps * (measured["step_seconds"][plan.kind] + eval_seconds * evals_per_step)
        for plan in setup.plans
        if plan.steps
    )
    fixed = eval_seconds * (len(setup.plans) + 2) + measured["recalibration_seconds"]
    x = (left - fixed) / per_x if per_x > 0 else 0.0
    steps = {plan.kind: int(x * plan.steps) for plan in setup.plans}
    if any(count < 1 for plan in setup.plans if plan.steps for count in [steps[plan.kind]]):
        raise UserError(
            f"--time-budget {config.time_budget:g} minutes leaves no time to train: setup and "
            f"the step probe took {clock() - started:.1f} s, a step takes "
            + ", ".join(f"{s:.2f} s ({k})" for k, s in measured["step_seconds"].items())
            + f", an evaluation {eval_seconds:.2f} s and the BatchNorm recalibration before "
            f"saving {measured['recalibration_seconds']:.1f} s; give more minutes"
        )
    plan = {"steps": steps, **measured}
    fix_plan(setup, plan, seconds, clock, started)


def fix_plan(setup: Setup, plan: dict, seconds: float, clock, started: float) -> None:
    """Put the planned steps into the settings and stage plans; attach the budget."""
    steps = plan["steps"]
    changes = {"kd_steps": steps["kd"]} if "kd" in steps else {}
    if "ssl" in steps:
        changes["ssl_steps"] = steps["ssl"]
    setup.config = dataclasses.replace(setup.config, **changes)
    setup.plans = plan_stages(setup.config)
    setup.budget = Budget(seconds=seconds, clock=clock, started=started, plan=plan)


def resume_budget(setup: Setup, manifest: dict, clock: Callable[[], float]) -> None:
    """Continue the checkpoint's plan with the time it had left (no new plan)."""
    recorded = (manifest.get("state") or {}).get("budget")
    if not isinstance(recorded, dict):
        raise UserError(
            f"--resume: the checkpoint in {setup.out} was not planned by --time-budget; "
            "resume without it"
        )
    plan = {key: value for key, value in recorded.items() if key != "used_seconds"}
    started = clock() - float(recorded["used_seconds"])
    fix_plan(setup, plan, 60.0 * setup.config.time_budget, clock, started)


# --------------------------------------------------------------------------- the probe


def measure(setup: Setup, clock: Callable[[], float]) -> dict:
    """Seconds per step of each stage kind, per evaluation and for the recalibration.

    The copy, its optimizer and samplers are thrown away and every random generator is
    restored, so the run itself is untouched.
    """
    from zmdevice.training.checkpoint import rng_state, set_rng_state

    saved = rng_state(setup)
    step_seconds, probe = {}, None
    for index, plan in enumerate(setup.plans):
        if plan.steps and plan.kind not in step_seconds:  # a 0-step stage stays at 0
            probe = probe_setup(setup)
            step_seconds[plan.kind] = time_steps(probe, index, clock)
    began = clock()
    evaluate_now(probe, StagePlan("kd", 1))
    eval_seconds = clock() - began
    recalibration_seconds = 0.0
    batches = recalibration_batches(setup)
    if batches:
        began = clock()
        recalibrate(replace_config(probe, bn_recalibration_batches=1))
        recalibration_seconds = (clock() - began) * batches
    set_rng_state(setup, saved)
    return {
        "step_seconds": {kind: round(value, 6) for kind, value in step_seconds.items()},
        "eval_seconds": round(eval_seconds, 6),
        "recalibration_seconds": round(recalibration_seconds, 6),
    }


def replace_config(setup: Setup, **changes) -> Setup:
    """A copy of ``setup`` with settings changed (the original is left as it was)."""
    return dataclasses.replace(setup, config=dataclasses.replace(setup.config, **changes))


def probe_setup(setup: Setup) -> Setup:
    """A setup training a copy of the student, with no evaluations, logs or checkpoints."""
    student = copy.deepcopy(setup.student)
    config = dataclasses.replace(
        setup.config,
        eval_every=0,
        checkpoint_every=0,
        log_every=10**9,
        stop_after=None,
        early_stop_agreement=1.0,
    )
    steps = PROBE_WARM_STEPS + PROBE_TIMED_STEPS + 1
    return dataclasses.replace(
        setup,
        config=config,
        plans=[dataclasses.replace(plan, steps=steps) for plan in setup.plans],
        student=student,
        model=StepModel(student),
        log=NullLog(),
        on_step=None,
        budget=None,
        guard=None,
    )


def time_steps(probe: Setup, stage_index: int, clock: Callable[[], float]) -> float:
    """Mean seconds of the timed steps of stage ``stage_index`` in ``probe``."""
    from zmdevice.training.loop import run_stage

    stamps = []
    probe.on_step = lambda setup, state, values: stamps.append(clock())
    state = new_state(probe)
    state["stage_index"] = stage_index
    begin_stage(probe, state)
    run_stage(probe, state, save_checkpoint=lambda setup, state: None)
    # stamps[k] is taken after step k + 1; the last step also evaluates (not timed here).
    timed = stamps[PROBE_WARM_STEPS - 1 : PROBE_WARM_STEPS + PROBE_TIMED_STEPS]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


class NullLog:
    """A metrics log that keeps nothing (the probe's)."""

    def write(self, state: dict, plan: StagePlan, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def summary_line(budget: Budget | None, state: dict) -> str | None:
    """The summary's line about the plan (None without --time-budget)."""
    if budget is None:
        return None
    plan = budget.plan
    steps = " + ".join(f"{kind} {count}" for kind, count in plan["steps"].items())
    measured = ", ".join(f"{kind} {s:.3f} s/step" for kind, s in plan["step_seconds"].items())
    return (
        f"  time budget {budget.seconds / 60:g} min: planned {steps} steps from measured "
        f"{measured}, evaluation {plan['eval_seconds']:.2f} s, recalibration "
        f"{plan.get('recalibration_seconds', 0.0):.1f} s; used {budget.used() / 60:.2f} min"
        + ("; stopped on time" if state["stopped"] == "time budget" else "")
    )


def start_budget(setup: Setup, clock: Callable[[], float], started: float) -> None:
    """Plan a fresh run; a resumed one continues its checkpoint's plan."""
    from zmdevice.training.checkpoint import read_manifest

    if setup.config.resume:
        resume_budget(setup, read_manifest(setup.out), clock)
    else:
        plan_budget(setup, clock, started)
