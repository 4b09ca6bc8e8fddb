"""Stage 2's weight average (``TrainConfig.ssl_weight_average``), on by default.

Stage 2 starts from stage 1's selected weights and, on a CPU budget, moves away from them
fast: it fits its few labeled examples and its last weights can end below where it began
(docs/training.md). With the option on (the default, chosen on dev across the benchmark's
domains), the run keeps an exponential moving average of the student's weights from stage
2's first step, started at stage 1's weights, and stage 2 ends on that average instead of
its last weights (when the collapse guard did not end it: a rollback restores the guard's
weights, which win). The horizon, 1 / (1 - momentum), is the given share of stage 2's steps,
so one setting means the same on a 100-step and a 10,000-step stage; at share 1 stage 1's
weights keep about e^-1 of the final average.

The average lives on the student's device beside it (one more copy of the weights), is
part of ``state`` and so of checkpoints, and the evaluations of a run with ``--test`` log
its accuracy as ``average_test_accuracy`` next to the live weights' ``test_accuracy``.
Floating tensors are averaged; integer buffers (BatchNorm's batch counter) are copied. An
image run re-estimates BatchNorm statistics after the average is loaded, as for any model.

It reaches the loop as three handlers (``training.loop.Loop``): ``step_average``
(``on_batch_end``), ``evaluate_average`` (``on_evaluate``) and ``end_average``
(``on_stage_end``); each does nothing while ``state["average"]`` is None.
"""

from __future__ import annotations

import contextlib

import torch


def start_average(config, plan, stage_index: int, student) -> dict | None:
    """The average at the start of an SSL stage that follows stage 1, else None."""
    if not (plan.uses_labeled and stage_index > 0 and config.ssl_weight_average > 0):
        return None
    horizon = max(1.0, config.ssl_weight_average * plan.steps)
    return {"momentum": 1.0 - 1.0 / horizon, "weights": copy_weights(student)}


def copy_weights(student) -> dict:
    """A copy of every tensor of the student's state, on its device."""
    return {key: value.detach().clone() for key, value in student.state_dict().items()}


def update_average(average: dict, student) -> None:
    """One step: average <- momentum * average + (1 - momentum) * weights.

    Runs after every stage-2 step, so the floating tensors go through one fused ``foreach``
    lerp (on an accelerator, a few kernel launches instead of one per tensor).
    """
    weights, share = average["weights"], 1.0 - average["momentum"]
    averaged, live = [], []
    with torch.no_grad():
        for key, value in student.state_dict().items():
            if value.is_floating_point():
                averaged.append(weights[key])
                live.append(value)
            else:
                weights[key].copy_(value)
        torch._foreach_lerp_(averaged, live, share)


def restore_average(saved: dict | None, student) -> dict | None:
    """A checkpoint's average, each tensor in its live weight's device and layout."""
    if saved is None:
        return None
    live = student.state_dict()
    weights = {
        key: torch.empty_like(live[key]).copy_(value) for key, value in saved["weights"].items()
    }
    return {"momentum": float(saved["momentum"]), "weights": weights}


@contextlib.contextmanager
def averaged_weights(student, average: dict):
    """The student carries the average inside the block, its own weights after it."""
    live = copy_weights(student)
    student.load_state_dict(average["weights"])
    try:
        yield
    finally:
        student.load_state_dict(live)


def end_with_average(state: dict, student) -> None:
    """At the end of the stage: load the average unless the guard ended the stage."""
    average, state["average"] = state["average"], None
    fired = (state.get("guard") or {}).get("fired")
    if average is not None and not fired:
        student.load_state_dict(average["weights"])


# --------------------------------------------------------------------------- loop handlers


def step_average(loop, state: dict) -> None:
    """``on_batch_end``: fold the step's weights into the average."""
    if state["average"] is not None:
        update_average(state["average"], loop.setup.student)


def evaluate_average(loop, state: dict) -> None:
    """``on_evaluate``: log the averaged weights' test accuracy (with --test; rank 0)."""
    from zmdevice.training.evaluation import evaluate_now

    setup = loop.setup
    if state["average"] is None or not setup.ranks.is_main or setup.data.test_index is None:
        return
    with averaged_weights(setup.student, state["average"]):
        results = evaluate_now(setup, loop.plan)
    loop.log.write(state, loop.plan, {f"average_{key}": value for key, value in results.items()})


def end_average(loop, state: dict) -> None:
    """``on_stage_end``: the stage ends on the average (``end_with_average``)."""
    end_with_average(state, loop.setup.student)
