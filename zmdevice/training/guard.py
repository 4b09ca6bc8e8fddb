"""The stage-2 collapse guard: label-free signals, a rule that knows a weak teacher, a rollback.

SSL losses can feed on their own mistakes until the main head puts nearly everything, or
most of one class, into a few classes. The guard watches, at every stage-2 evaluation and
once before its first step, signals that need no test labels, all on the main head's
clean-view predictions on the held-out slice that stage 1 keeps for model selection (eval
mode, no gradient, no random numbers, so a guard that does not fire changes nothing):

- ``guard_heldout_agreement``: agreement with the pseudo-labels (methods with an FM only);
- ``guard_class_entropy``: entropy (nats) of the predicted-class histogram;
- ``guard_class_counts``: that histogram;
- ``guard_labeled_accuracy``: accuracy on the labeled set (logged, not part of the rule).

A student that learns from true labels must disagree with a teacher that is often wrong, so
agreement alone cannot tell learning from collapse: with an FM right on 27% of the labels,
healthy stage-2 runs fall from 66% to 44% agreement while the classes spread out. The rule
therefore judges agreement against what the labels' own accuracy allows. If the pseudo-labels
are right on a share ``a`` of the samples, any student at least as accurate as they are
agrees with them on at least ``2a - 1`` (both are right together on ``a + s - 1``); below
that floor the student is worse than the labels it was distilled from (judged only when it
was above the floor at stage 2's start). ``a`` is measured,
never assumed: the cross-validated accuracy ``zmdevice label`` recorded for the labels it
chose, else the zero-shot labels' accuracy on the labeled examples, taken at its lower
one-sided 95% bound; for a label file made from the labeled examples without such a
record, and for an FM right on half the labels or less, there is no floor.

A collapse, at ``collapse_patience`` evaluations in a row (or at the stage's last one), is
any of (thresholds in ``TrainConfig``; judged only on ``MIN_HELDOUT`` or more samples):

- agreement below the floor above;
- class entropy below ``collapse_entropy_fraction`` of its stage-2 highest (the main head
  predicting few classes);
- a class losing most of its predictions: one that held at least ``1 / (2C)`` of the slice
  at stage 2's start keeps less than ``collapse_class_fraction`` of them, by more than the
  slice's size explains (``CLASS_LOSS_SIGNIFICANCE``), while the class entropy is below its
  start or the labels are measured to be right more often than not (their lower bound above
  one half). With a teacher often wrong, a class that shrinks while the predictions spread
  more evenly is a student correcting its teacher's bias.

Earlier breaches are logged as ``collapse_suspected``. The guard keeps in ``state["guard"]``
(and so in checkpoints) the weights of the latest evaluation that passed the rule. On a
collapse it warns on stderr, logs a ``collapse`` record (``report.md`` and ``curves.png``
show it), and ends stage 2: ``rollback`` restores those weights and finishes, ``distill``
restores them and spends the steps stage 2 had left on a stage-1 distillation stage (with
its own fresh schedule and held-out model selection), ``stop`` finishes with the weights as
they are. ``distill``'s stage is recorded in the guard's memory, from which the loop's
``stage_plans`` adds it (``plans_after_collapse``), in this run and a resumed one.

The guard is a pair of loop handlers (``training.loop.Loop``): ``on_stage_start`` takes
stage 2's baseline, ``on_evaluate`` judges each evaluation and ends the stage on a collapse.
"""

from __future__ import annotations

import math
import sys

import torch

from zmdevice.metrics import binomial_tail
from zmdevice.training.evaluation import predict
from zmdevice.training.loop import Loop, Setup, cpu_state
from zmdevice.training.stages import DistillStage, Stage

MIN_HELDOUT = 20
"""Held-out samples below which the guard only logs: on a handful of samples one changed
prediction moves agreement by many points and the class histogram is noise."""


CLASS_LOSS_SIGNIFICANCE = 0.05
"""A class's loss counts only when so few predictions would be this unlikely (one-sided
binomial, at the class's share at stage 2's start), shared over the classes judged
(Bonferroni). On a small slice a class of a handful of predictions halves by chance: 50
held-out digits, 10 classes, ``five`` kept 2 of its 5 (p = 0.11) in healthy dev runs, and the
rule without this test rolled back 8 of 11 digits runs; the default text data's collapse
(``artifact`` 17 -> 6 of 100, p = 0.001 against 0.05 / 8) is still caught."""

CONFIDENCE_Z = 1.645
"""z of the one-sided 95% bound on the labels' measured accuracy (``lower_bound``)."""


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the histogram of ``predicted`` class ids."""
    counts = torch.bincount(predicted, minlength=num_classes).double()
    shares = counts[counts > 0] / counts.sum().clamp(min=1)
    return float(-(shares * shares.log()).sum()) + 0.0  # no -0.0


def observe(setup: Setup) -> dict:
    """The guard's signals for the student as it is now."""
    data, size = setup.data, setup.config.eval_batch_size
    predicted = predict(setup.student, data, data.holdout, size, setup.device)
    counts = torch.bincount(predicted, minlength=len(data.classes))
    signals = {
        "guard_class_entropy": class_entropy(predicted, len(data.classes)),
        "guard_class_counts": counts.tolist(),
    }
    if data.fm_label is not None:
        agreement = (predicted == data.fm_label[data.holdout]).float().mean()
        signals["guard_heldout_agreement"] = float(agreement)
    labeled = predict(setup.student, data, data.labeled_index, size, setup.device)
    signals["guard_labeled_accuracy"] = float((labeled == data.labeled_y).float().mean())
    return signals


def lower_bound(right: int, count: int, z: float = CONFIDENCE_Z) -> float:
    """The one-sided lower Wilson bound of a share ``right / count`` (0 for no count)."""
    if count <= 0:
        return 0.0
    share = right / count
    centre = share + z * z / (2 * count)
    margin = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count))
    return max(0.0, (centre - margin) / (1 + z * z / count))


def agreement_floor(label_accuracy: tuple[int, int] | None) -> float | None:
    """The least agreement with pseudo-labels right on (right, count) of the labeled
    examples that a student at least as accurate keeps: ``2a - 1`` at the lower bound of
    ``a``; None when unknown or not above 0."""
    if label_accuracy is None:
        return None
    floor = 2 * lower_bound(*label_accuracy) - 1
    return floor if floor > 0 else None


def collapse_reason(config, signals: dict, memory: dict) -> str | None:
    """Why ``signals`` are a collapse by the rule, or None."""
    agreement, floor = signals.get("guard_heldout_agreement"), memory.get("agreement_floor")
    if agreement is not None and floor is not None and agreement < floor:
        return (
            f"held-out agreement with the pseudo-labels fell to {100 * agreement:.1f}%, below "
            f"the {100 * floor:.1f}% any student as accurate as those labels keeps"
        )
    entropy, highest = signals["guard_class_entropy"], memory["highest_entropy"]
    if entropy < config.collapse_entropy_fraction * highest:
        return (
            f"predicted-class entropy on the held-out slice fell to {entropy:.3f} nats from "
            f"{highest:.3f} (below {config.collapse_entropy_fraction:g} of it)"
        )
    lost = lost_class(config, signals, memory)
    if lost is not None:
        name, before, now = lost
        return (
            f"class {name} kept {now} of its {before} held-out predictions at stage 2's start "
            f"(less than {config.collapse_class_fraction:g} of them)"
        )
    return None


def lost_class(config, signals: dict, memory: dict) -> tuple[str, int, int] | None:
    """(class, predictions at stage 2's start, now) of the class that lost the largest share
    of its predictions, when that breaks the class rule (module docstring); else None."""
    counts, start = signals.get("guard_class_counts"), memory.get("start_counts")
    fraction = config.collapse_class_fraction
    if not fraction or counts is None or start is None:
        return None
    spreading = signals["guard_class_entropy"] >= memory["start_entropy"]
    if spreading and not memory.get("labels_mostly_right"):
        return None
    total, classes = sum(start), len(start)
    judged = [c for c in range(classes) if start[c] >= max(1.0, total / (2 * classes))]
    level = CLASS_LOSS_SIGNIFICANCE / max(1, len(judged))
    lost = [
        c
        for c in judged
        if counts[c] < fraction * start[c]
        and fewer_by_chance(counts[c], sum(counts), start[c] / total) < level
    ]
    worst = min(lost, key=lambda c: counts[c] / start[c], default=None)
    if worst is None:
        return None
    names = memory.get("classes") or [str(c) for c in range(classes)]
    return names[worst], start[worst], counts[worst]


def fewer_by_chance(count: int, total: int, share: float) -> float:
    """P(at most ``count`` of ``total`` predictions fall in a class of ``share``)."""
    return binomial_tail(total - count, total, 1.0 - share)


def new_memory(
    signals: dict, floor: float | None = None, classes=None, mostly_right: bool | None = None
) -> dict:
    """The guard's memory at stage 2's first observation.

    ``floor``: the agreement floor (``agreement_floor``) to judge, or None. A student already
    below it at stage 2's start never reached its labels' accuracy in stage 1, so falling
    further says nothing: the floor is then dropped. ``mostly_right``: whether the labels
    are measured right on more than half the samples (default: a floor is given).
    """
    mostly_right = floor is not None if mostly_right is None else mostly_right
    agreement = signals.get("guard_heldout_agreement")
    if floor is not None and (agreement is None or agreement < floor):
        floor = None
    return {
        "highest_entropy": signals["guard_class_entropy"],
        "start_entropy": signals["guard_class_entropy"],
        "start_counts": signals.get("guard_class_counts"),
        "agreement_floor": floor,
        "labels_mostly_right": mostly_right,
        "classes": classes,
    }


def judge(
    config, signals: dict, memory: dict, step: int, last: bool, judged: bool = True
) -> tuple[str | None, bool]:
    """Apply the rule to one evaluation, updating ``memory``: (reason, act).

    ``reason`` says why the signals break the rule (None: they pass); ``act`` is True when
    the breach has lasted ``collapse_patience`` evaluations or ``last`` (the stage's last
    evaluation) is set; with ``judged`` False every evaluation passes. An evaluation that
    passes raises ``highest_entropy`` and becomes ``best_step``, the rollback target. Pure,
    so that tests and benchmarks replay the rule on logged signals with the same code.
    """
    reason = collapse_reason(config, signals, memory) if judged else None
    if reason is None:
        memory["breaches"] = 0
        memory["highest_entropy"] = max(memory["highest_entropy"], signals["guard_class_entropy"])
        memory["best_step"] = step
        return None, False
    memory["breaches"] = memory.get("breaches", 0) + 1
    return reason, memory["breaches"] >= config.collapse_patience or last


def add_guard(loop: Loop) -> None:
    """Watch the run of ``loop`` unless ``collapse_guard`` is off."""
    if loop.setup.config.collapse_guard != "off":
        guard = CollapseGuard()
        loop.add_callback("on_stage_start", guard.on_stage_start)
        loop.add_callback("on_evaluate", guard.on_evaluate)


class CollapseGuard:
    """Observes stage-2 evaluations; ``on_evaluate`` ends training on a collapse."""

    def on_stage_start(self, loop: Loop, state: dict) -> None:
        """The stage-2 baseline, before its first step (kept on resume)."""
        if loop.plan.uses_labeled and state.get("guard") is None:
            self.on_evaluate(loop, state)

    def on_evaluate(self, loop: Loop, state: dict) -> bool:
        """Observe and log; on a collapse act as configured and return True (the stage
        ends)."""
        setup, plan, log = loop.setup, loop.plan, loop.log
        if not plan.uses_labeled:
            return False
        config = setup.config
        signals = observe(setup)
        memory = state.get("guard")
        if memory is None:
            data = setup.data
            floor = agreement_floor(data.label_accuracy)
            judged_floor = floor if config.collapse_agreement else None
            memory = new_memory(signals, judged_floor, data.classes, floor is not None)
            state["guard"] = memory
        log.write(
            state,
            plan,
            {
                **signals,
                "guard_agreement_floor": memory["agreement_floor"],
                "guard_labels_mostly_right": memory["labels_mostly_right"],
            },
        )
        last, judged = state["step"] >= plan.steps, len(setup.data.holdout) >= MIN_HELDOUT
        reason, act = judge(config, signals, memory, state["step"], last, judged)
        if reason is None:
            if memory["best_step"] == state["step"]:
                memory["best_state"] = cpu_state(setup.student)
            return False
        if not act:
            log.write(state, plan, {"collapse_suspected": reason})
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
        log.write(
            state,
            plan,
            {"collapse": reason, "collapse_action": action, "rolled_back_to": rolled_back_to},
        )
        print(
            f"warning: collapse at stage-2 step {state['step']}: {reason}; "
            f"{outcome(memory['fired'])} (collapse_guard = {action})",
            file=sys.stderr,
        )
        if not distill_steps:
            state["stopped"] = "collapse"
        return True


def plans_after_collapse(memory: dict | None) -> tuple[Stage, ...]:
    """The distillation stage a ``distill`` collapse added (none for other outcomes)."""
    fired = (memory or {}).get("fired") or {}
    steps = fired.get("distill_steps", 0)
    return (DistillStage(steps),) if steps else ()


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
        floor = memory.get("agreement_floor")
        judged = "no agreement floor" if floor is None else f"agreement floor {100 * floor:.1f}%"
        return f"  collapse guard: no collapse in stage 2 ({judged})"
    return f"  COLLAPSE at stage-2 step {fired['step']}: {fired['reason']}; {outcome(fired)}"
