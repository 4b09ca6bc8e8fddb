"""The stage-2 collapse guard: label-free signals, a fixed rule, a rollback.

SSL losses can feed on their own mistakes until the main head puts nearly everything into a
few classes. The guard watches, at every stage-2 evaluation and once before its first step,
signals that need no test labels, all on the main head's clean-view predictions (eval mode,
no gradient, no random numbers, so a guard that does not fire changes nothing):

- ``guard_heldout_agreement``: agreement with the FM's labels on the held-out slice that
  stage 1 keeps for model selection (methods with an FM only). Stage 2 draws its unlabeled
  batches from the whole pool, so in stage 2 this measures agreement, not generalisation;
- ``guard_class_entropy``: entropy (nats) of the predicted-class histogram on that slice;
- ``guard_labeled_accuracy``: accuracy on the labeled set (logged, not part of the rule).

The rule (thresholds in ``TrainConfig``; judged only on ``MIN_HELDOUT`` or more held-out
samples): a collapse is class entropy below ``collapse_entropy_fraction`` of its stage-2
highest (the main head predicting few classes), or held-out agreement more than
``collapse_agreement_drop`` below its stage-2 best, at ``collapse_patience`` evaluations in a
row (or at the stage's last one); earlier breaches are logged as ``collapse_suspected``. The
agreement drop (15 points) and the patience (3) were chosen on dev by replaying rules on
logged runs (``benchmarks/guard_replay.py``, docs/training.md): at 1 label per class stage 2
can pull the student away from the FM for good and cost dev accuracy, while healthy runs at 4
labels per class dip by up to 17 points for one or two evaluations and recover.
The guard keeps in ``state["guard"]``
(and so in checkpoints) the weights of the best evaluation: highest agreement with an FM,
else the latest one the rule passed. On a collapse it warns on stderr, logs a ``collapse``
record, and ends stage 2: ``rollback`` restores those weights and finishes, ``distill``
restores them and spends the steps stage 2 had left on a stage-1 distillation stage (with
its own fresh schedule and held-out model selection), ``stop`` finishes with the weights as
they are. ``distill`` adds that stage to ``setup.plans``; it is recorded in the guard's
memory, so a resumed run rebuilds it (``plans_after_collapse``).
"""

from __future__ import annotations

import sys

import torch

from zmdevice.training.loop import Setup, cpu_state, predict
from zmdevice.training.stages import StagePlan

MIN_HELDOUT = 20
"""Held-out samples below which the guard only logs: on a handful of samples one changed
prediction moves agreement by many points and the class histogram is noise."""


def make_guard(config) -> CollapseGuard | None:
    return None if config.collapse_guard == "off" else CollapseGuard()


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the histogram of ``predicted`` class ids."""
    counts = torch.bincount(predicted, minlength=num_classes).double()
    shares = counts[counts > 0] / counts.sum().clamp(min=1)
    return float(-(shares * shares.log()).sum()) + 0.0  # no -0.0


def observe(setup: Setup) -> dict:
    """The guard's signals for the student as it is now."""
    data, size = setup.data, setup.config.eval_batch_size
    predicted = predict(setup.student, data, data.holdout, size, setup.device)
    signals = {"guard_class_entropy": class_entropy(predicted, len(data.classes))}
    if data.fm_label is not None:
        agreement = (predicted == data.fm_label[data.holdout]).float().mean()
        signals["guard_heldout_agreement"] = float(agreement)
    labeled = predict(setup.student, data, data.labeled_index, size, setup.device)
    signals["guard_labeled_accuracy"] = float((labeled == data.labeled_y).float().mean())
    return signals


def collapse_reason(config, signals: dict, memory: dict) -> str | None:
    """Why ``signals`` are a collapse by the rule, or None."""
    agreement, best = signals.get("guard_heldout_agreement"), memory.get("best_agreement")
    drop = config.collapse_agreement_drop
    if drop and agreement is not None and best is not None and agreement < best - drop:
        return (
            f"held-out agreement with the FM fell to {100 * agreement:.1f}% from its "
            f"stage-2 best {100 * best:.1f}% (more than "
            f"{100 * drop:.0f} points)"
        )
    entropy, highest = signals["guard_class_entropy"], memory["highest_entropy"]
    if entropy < config.collapse_entropy_fraction * highest:
        return (
            f"predicted-class entropy on the held-out slice fell to {entropy:.3f} nats from "
            f"{highest:.3f} (below {config.collapse_entropy_fraction:g} of it)"
        )
    return None


def new_memory(signals: dict) -> dict:
    """The guard's memory at stage 2's first observation."""
    return {"highest_entropy": signals["guard_class_entropy"]}


def judge(
    config, signals: dict, memory: dict, step: int, last: bool, judged: bool = True
) -> tuple[str | None, bool]:
    """Apply the rule to one evaluation, updating ``memory``: (reason, act).

    ``reason`` says why the signals break the rule (None: they pass); ``act`` is True when
    the breach has lasted ``collapse_patience`` evaluations or ``last`` (the stage's last
    evaluation) is set; with ``judged`` False every evaluation passes. An evaluation that
    passes raises ``highest_entropy`` and, when it is the best so far (highest FM agreement,
    else the latest), becomes ``best_step``. Pure, so that ``benchmarks/guard_replay.py``
    replays rules on logged signals with the same code.
    """
    reason = collapse_reason(config, signals, memory) if judged else None
    if reason is None:
        memory["breaches"] = 0
        memory["highest_entropy"] = max(memory["highest_entropy"], signals["guard_class_entropy"])
        agreement = signals.get("guard_heldout_agreement")
        best = memory.get("best_agreement")
        if agreement is None or best is None or agreement > best:
            if agreement is not None:
                memory["best_agreement"] = agreement
            memory["best_step"] = step
        return None, False
    memory["breaches"] = memory.get("breaches", 0) + 1
    return reason, memory["breaches"] >= config.collapse_patience or last


class CollapseGuard:
    """Observes stage-2 evaluations; ``check`` says when training must end."""

    def begin(self, setup: Setup, state: dict, plan: StagePlan) -> None:
        """The stage-2 baseline, before its first step (kept on resume)."""
        if plan.uses_labeled and state.get("guard") is None:
            self.check(setup, state, plan)

    def check(self, setup: Setup, state: dict, plan: StagePlan) -> bool:
        """Observe and log; on a collapse act as configured and return True."""
        if not plan.uses_labeled:
            return False
        config = setup.config
        signals = observe(setup)
        memory = state.get("guard")
        if memory is None:
            memory = state["guard"] = new_memory(signals)
        setup.log.write(state, plan, signals)
        last, judged = state["step"] >= plan.steps, len(setup.data.holdout) >= MIN_HELDOUT
        reason, act = judge(config, signals, memory, state["step"], last, judged)
        if reason is None:
            if memory["best_step"] == state["step"]:
                memory["best_state"] = cpu_state(setup.student)
            return False
        if not act:
            setup.log.write(state, plan, {"collapse_suspected": reason})
            return False
        action = config.collapse_guard
        rolled_back_to = memory.get("best_step") if action in ("rollback", "distill") else None
        if rolled_back_to is not None:
            setup.student.load_state_dict(memory["best_state"])
        distill_steps = plan.steps - state["step"] if action == "distill" else 0
        memory["fired"] = {
            "step": state["step"],
            "reason": reason,
            "action": action,
            "rolled_back_to": rolled_back_to,
            "distill_steps": distill_steps,
        }
        setup.plans.extend(plans_after_collapse(memory))
        setup.log.write(state, plan, {"collapse": reason, "collapse_action": action})
        print(
            f"warning: collapse at stage-2 step {state['step']}: {reason}; "
            f"{outcome(memory['fired'])} (collapse_guard = {action})",
            file=sys.stderr,
        )
        if not distill_steps:
            state["stopped"] = "collapse"
        return True


def plans_after_collapse(memory: dict | None) -> list[StagePlan]:
    """The distillation stage a ``distill`` collapse added (none for other outcomes)."""
    fired = (memory or {}).get("fired") or {}
    steps = fired.get("distill_steps", 0)
    return [StagePlan("kd", steps)] if steps else []


def outcome(fired: dict) -> str:
    """What the guard did after a collapse, in words."""
    if fired["rolled_back_to"] is None:
        return "stopped training and kept the weights as they are"
    done = f"rolled back to the weights of stage-2 step {fired['rolled_back_to']}"
    steps = fired.get("distill_steps", 0)
    if steps:
        return f"{done} and distils the FM for the {steps} steps stage 2 had left"
    return f"stopped training and {done}"


def summary_line(state: dict) -> str | None:
    """The summary's line about the guard (None when it was off or never observed)."""
    memory = state.get("guard")
    if not memory:
        return None
    fired = memory.get("fired")
    if fired is None:
        best = memory.get("best_agreement")
        agreement = "" if best is None else f", best held-out FM agreement {100 * best:.1f}%"
        return f"  collapse guard: no collapse in stage 2{agreement}"
    return f"  COLLAPSE at stage-2 step {fired['step']}: {fired['reason']}; {outcome(fired)}"
