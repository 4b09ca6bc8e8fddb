"""``--precision auto`` for training by measurement (the labeling half is ``zmdevice.calibrate``).

A few training steps of fp32 and of bf16 (where the hardware has bf16) from the same weights
on the same batches, the first untimed, through the loop's own ``train_step``; bf16 is kept
only when its steps are faster and the loss of its last step is within
``TRAIN_LOSS_TOLERANCE`` of fp32's. The student's weights and every random stream are
restored afterwards, so the run trains as if nothing had been measured. The decision is
cached like a teacher's (``zmdevice.calibrate``: the key, the file, a bad file ignored).

The table of ``zmdevice.precision`` decides without measuring: an explicit ``--precision``,
no bf16 on the device, a first stage with the KD head, several training processes (each
would measure its own), and, without a cached decision, a resumed run or one of fewer than
``MIN_TRAIN_STEPS`` steps.
"""

from __future__ import annotations

import math
import sys

from zmdevice import calibrate
from zmdevice import precision as numerics
from zmdevice.calibrate import (
    CACHE_VERSION,
    Timer,
    cache_path,
    has_bf16,
    machine_identity,
    normalised,
    read_decision,
    write_decision,
)

TRAIN_STEPS = 3
"""Timed training steps per precision (after one untimed warm-up step)."""
TRAIN_TIME_CAP_S = 10.0
"""Timed seconds of a training calibration in all (one timed step at least)."""
TRAIN_LOSS_TOLERANCE = 0.05
"""bf16's last measured loss must be within 5% of fp32's (0.01 absolute for losses below 0.2)."""
MIN_TRAIN_STEPS = 100
"""Steps a run must train to measure (calibration takes 2 x 4 steps)."""


def student_candidates(hardware: numerics.Hardware) -> list[str]:
    """Precisions a training step is measured in: fp32, and bf16 where the device has it
    (fp16 needs loss scaling and stays with the table)."""
    return ["fp32"] + ["bf16"] * has_bf16(hardware)


def calibrated_precision(setup, requested: str, timer: Timer | None = None):
    """The precision of the training steps of ``setup`` (a ``training.loop.Setup`` at the
    table's precision, ``setup.precision``): measured or cached when ``requested`` is
    ``auto`` (see the module doc), else the table's.

    Returns:
        A ``zmdevice.precision.Precision`` whose reason says how it was decided.
    """
    if requested != "auto" or setup.ranks.active:
        return setup.precision
    hardware = numerics.Hardware.probe(setup.device)
    names = student_candidates(hardware)
    plan, config = setup.plans[0], setup.config
    if len(names) < 2 or plan.kd_head:
        return setup.precision
    identity = normalised(
        {
            "what": "student",
            "version": CACHE_VERSION,
            "student": config.student,
            "modality": setup.data.modality,
            "stage": plan.name,
            "rows": plan.rows_per_step(config),
            "image_size": config.image_size,
            "max_length": config.max_length,
            "freeze_embeddings": setup.freeze_embeddings,
            **machine_identity(setup.device),
            "candidates": names,
        }
    )
    path = cache_path(identity)
    decision = read_decision(path, identity, names, ("speedup", "loss_difference"))
    cached = decision is not None
    if not cached:
        if config.resume or sum(p.steps for p in setup.plans) < MIN_TRAIN_STEPS:
            return setup.precision
        print(
            f"calibrating the training precision on {1 + TRAIN_STEPS} steps each: "
            f"{', '.join(names)} (once for this student and machine; cached in {path.parent})",
            file=sys.stderr,
        )
        decision = measure_student(setup, names, timer or calibrate.measure_call)
        write_decision(path, identity, decision)
    name = decision["chosen"]
    result = decision["candidates"][name]
    how = "cached measurement" if cached else "measured"
    reason = f"auto, {how}: {name} steps {result['speedup']:.2f}x fp32's"
    if name != "fp32":
        reason += f", last loss {100 * result['loss_difference']:.2f}% off fp32's"
    return numerics.Precision(name, setup.device.type, reason)


def measure_student(setup, names: list[str], timer: Timer) -> dict:
    """Train a few steps of the first stage in each precision of ``names`` (fp32 first) from
    the same weights, batches and random state; restore the weights and random streams.

    Returns:
        {"chosen": the fastest that passes, "candidates": {name: {"seconds_per_step",
        "speedup" (vs fp32), "loss" (of the last step), "loss_difference" (relative to
        fp32's), "steps", "passed"}}}.
    """
    import copy
    import random

    import numpy as np
    import torch

    from zmdevice.training.loop import draw_batches, make_samplers

    student, config, plan = setup.student, setup.config, setup.plans[0]
    saved = copy.deepcopy(student.state_dict())
    training = student.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [setup.device] if setup.device.type == "cuda" else []
    results: dict[str, dict] = {}
    try:
        with torch.random.fork_rng(devices=devices):
            samplers = make_samplers(setup, plan, config.seed * 1000)  # stage 1's
            # One at a time: only image batches can be drawn several at once.
            batches = [draw_batches(setup, samplers, plan, 1)[0] for _ in range(1 + TRAIN_STEPS)]
            share, steps = TRAIN_TIME_CAP_S / len(names), TRAIN_STEPS
            for name in names:
                torch.manual_seed(config.seed)  # the same dropout for every candidate
                precision = numerics.Precision(name, setup.device.type, "")
                results[name] = trial_steps(setup, batches[: 1 + steps], precision, share, timer)
                steps = results[name]["steps"]  # the others: as many as fp32 managed
                student.load_state_dict(saved)
    finally:
        student.load_state_dict(saved)
        student.train(training)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    base = results["fp32"]
    for result in results.values():
        result["speedup"] = base["seconds_per_step"] / max(result["seconds_per_step"], 1e-12)
        difference = abs(result["loss"] - base["loss"])
        result["loss_difference"] = difference / max(abs(base["loss"]), 1e-12)
        result["passed"] = math.isfinite(result["loss"]) and difference <= max(
            TRAIN_LOSS_TOLERANCE * abs(base["loss"]), TRAIN_LOSS_TOLERANCE * 0.2
        )
    passed = [n for n, r in results.items() if r["passed"]]
    chosen = min(passed, key=lambda n: results[n]["seconds_per_step"])
    return {"chosen": chosen, "candidates": results}


def trial_steps(setup, batches: list, precision, share: float, timer: Timer) -> dict:
    """The first batch as an untimed warm-up step, then timed steps until the batches or
    ``share`` seconds are used up, each the loop's ``train_step`` on a throwaway optimizer
    (a trial state of the first stage, at ``precision``)."""
    from zmdevice.training.loop import make_optimizer, step_context, train_step
    from zmdevice.training.stages import StepModel

    config, plan = setup.config, setup.plans[0]
    trial = {
        "model": StepModel(setup.student, precision).train(),
        "scaler": precision.grad_scaler(),
        "alignment": setup.ranks.alignment(len(setup.data.classes), config.da_momentum),
    }
    trial["optimizer"], trial["scheduler"] = make_optimizer(
        setup.student, config, plan.steps, setup.freeze_embeddings
    )
    seconds, loss, steps = 0.0, math.nan, 0
    for step, batch in enumerate(batches):
        trial["step"] = step
        context = step_context(setup, trial, plan)

        def one_step(batch=batch, context=context) -> float:
            named = train_step(trial, plan, batch, context, config.grad_clip)
            return float(named["loss"].detach())

        elapsed, loss = timer(precision.name, one_step)
        if step:
            seconds, steps = seconds + elapsed, steps + 1
            if seconds >= share:
                break
    return {"seconds_per_step": seconds / max(steps, 1), "loss": loss, "steps": steps}
