"""``--time-budget``: plan the stages' steps from measured step times, stop on time.

Planning happens once, before the first step, because the learning-rate warmup and cosine,
and the alpha ramp of stage 2 are functions of a stage's total steps. A probe trains a
throwaway copy of the student for ``PROBE_STEPS`` steps of each stage kind (stage-1 KD and
stage-2 SSL steps cost differently) and times the steps after ``PROBE_WARM_STEPS`` warm
ones, then times one evaluation and one batch of the BatchNorm recalibration that precedes
saving (image students), which over the whole unlabeled pool can outlast a short budget's
training. Every random generator is restored afterwards, so a budget
run trains exactly like a run given the planned steps.

``build_setup`` plans before it freezes the run's settings (``start_budget``); the ``Budget``
then reaches the loop as one ``on_step_end`` handler, ``Budget.stop_on_time``.

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
from zmdevice.training.average import step_average
from zmdevice.training.evaluation import evaluate_now, recalibrate, recalibration_batches
from zmdevice.training.loop import Loop, NullLog, Setup, begin_stage, new_state
from zmdevice.training.stages import DistillStage, Stage

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


@dataclasses.dataclass(frozen=True)
class Budget:
    """A planned run's clock: the budget, when it began and what the probe measured."""

    seconds: float
    clock: Callable[[], float]
    started: float
    """``clock()`` when the budget began (moved back by the time used before a resume)."""
    plan: dict
    """Planned steps per stage name, measured seconds per step and per evaluation."""

    def used(self) -> float:
        return self.clock() - self.started

    def reserve(self) -> float:
        """Seconds kept for finishing when the run stops on time."""
        finishing = 2 * self.plan["eval_seconds"] + self.plan.get("recalibration_seconds", 0.0)
        return finishing + FINISH_SHARE * self.seconds

    def stop_on_time(self, loop: Loop, state: dict) -> bool:
        """``on_step_end``: True (logged, and the run marked stopped) once only the reserve
        is left."""
        if self.seconds - self.used() > self.reserve():
            return False
        loop.log.write(state, loop.plan, {"time_budget_stop": True})
        state["stopped"] = "time budget"
        return True

    def step_settings(self, plans: tuple[Stage, ...]) -> dict:
        """The planned steps as the settings they replace (``kd_steps``, ``ssl_steps``)."""
        steps = self.plan["steps"]
        return {plan.steps_field: steps[plan.name] for plan in plans if plan.name in steps}

    def record(self) -> dict:
        """What checkpoints keep: the plan and the time used so far."""
        return {**self.plan, "used_seconds": round(self.used(), 3)}


def plan_budget(setup: Setup, clock: Callable[[], float], started: float) -> Budget:
    """Measure and plan a fresh run (``setup``: the run's settings before the plan)."""
    config = setup.config
    seconds = 60.0 * config.time_budget
    measured = measure(setup, clock)
    left = seconds * (1 - RESERVE_SHARE) - (clock() - started)
    eval_seconds = measured["eval_seconds"]
    evals_per_step = 1 / config.eval_every if config.eval_every else 0.0
    # Steps scale with x: stage i runs x * ratio_i steps and one evaluation per eval_every
    # steps plus one at its end; two more evaluations' time is the finishing reserve.
    per_x = sum(
        plan.steps * (measured["step_seconds"][plan.name] + eval_seconds * evals_per_step)
        for plan in setup.plans
        if plan.steps
    )
    fixed = eval_seconds * (len(setup.plans) + 2) + measured["recalibration_seconds"]
    x = (left - fixed) / per_x if per_x > 0 else 0.0
    steps = {plan.name: int(x * plan.steps) for plan in setup.plans}
    if any(count < 1 for plan in setup.plans if plan.steps for count in [steps[plan.name]]):
        raise UserError(
            f"--time-budget {config.time_budget:g} minutes leaves no time to train: setup and "
            f"the step probe took {clock() - started:.1f} s, a step takes "
            + ", ".join(f"{s:.2f} s ({k})" for k, s in measured["step_seconds"].items())
            + f", an evaluation {eval_seconds:.2f} s and the BatchNorm recalibration before "
            f"saving {measured['recalibration_seconds']:.1f} s; give more minutes"
        )
    return Budget(seconds=seconds, clock=clock, started=started, plan={"steps": steps, **measured})


def resume_budget(setup: Setup, manifest: dict, clock: Callable[[], float]) -> Budget:
    """Continue the checkpoint's plan with the time it had left (no new plan)."""
    recorded = (manifest.get("state") or {}).get("budget")
    if not isinstance(recorded, dict):
        raise UserError(
            f"--resume: the checkpoint in {setup.out} was not planned by --time-budget; "
            "resume without it"
        )
    plan = {key: value for key, value in recorded.items() if key != "used_seconds"}
    started = clock() - float(recorded["used_seconds"])
    return Budget(seconds=60.0 * setup.config.time_budget, clock=clock, started=started, plan=plan)


# --------------------------------------------------------------------------- the probe


def measure(setup: Setup, clock: Callable[[], float]) -> dict:
    """Seconds per step of each stage name, per evaluation and for the recalibration.

    The copy, its optimizer and samplers are thrown away and every random generator is
    restored, so the run itself is untouched.
    """
    from zmdevice.training.checkpoint import rng_state, set_rng_state

    saved = rng_state(setup)
    step_seconds, probe = {}, None
    for index, plan in enumerate(setup.plans):
        if plan.steps and plan.name not in step_seconds:  # a 0-step stage stays at 0
            probe = probe_setup(setup)
            step_seconds[plan.name] = time_steps(probe, index, clock)
    began = clock()
    evaluate_now(probe, DistillStage(1))
    eval_seconds = clock() - began
    recalibration_seconds = 0.0
    batches = recalibration_batches(setup)
    if batches:
        began = clock()
        recalibrate(probe, max_batches=1)
        recalibration_seconds = (clock() - began) * batches
    set_rng_state(setup, saved)
    return {
        "step_seconds": {kind: round(value, 6) for kind, value in step_seconds.items()},
        "eval_seconds": round(eval_seconds, 6),
        "recalibration_seconds": round(recalibration_seconds, 6),
    }


def probe_setup(setup: Setup) -> Setup:
    """A setup training a copy of the student for the probe's steps of each stage (its loop
    has no evaluations, logs or checkpoints: ``time_steps``)."""
    student = copy.deepcopy(setup.student)
    steps = PROBE_WARM_STEPS + PROBE_TIMED_STEPS + 1
    plans = tuple(plan.with_steps(steps) for plan in setup.plans)
    return dataclasses.replace(setup, plans=plans, student=student)


def time_steps(probe: Setup, stage_index: int, clock: Callable[[], float]) -> float:
    """Mean seconds of the timed steps of stage ``stage_index`` in ``probe``."""
    stamps = []
    loop = Loop(probe, NullLog())
    loop.add_callback("on_batch_end", step_average)  # its cost is part of a step's
    loop.add_callback("on_step_end", lambda loop, state: stamps.append(clock()))
    state = new_state(probe)
    state["stage_index"] = stage_index
    begin_stage(probe, state)
    loop.run_stage(state)
    # stamps[k] is taken after step k + 1.
    timed = stamps[PROBE_WARM_STEPS - 1 : PROBE_WARM_STEPS + PROBE_TIMED_STEPS]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


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


def start_budget(setup: Setup, clock: Callable[[], float], started: float) -> Budget:
    """Plan a fresh run; a resumed one continues its checkpoint's plan."""
    from zmdevice.training.checkpoint import read_manifest

    if setup.config.resume:
        return resume_budget(setup, read_manifest(setup.out), clock)
    return plan_budget(setup, clock, started)
