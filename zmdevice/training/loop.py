"""The training loop: ``Setup`` is resolved once and frozen, ``state`` is one plain dict (the
checkpoint), and ``Loop.run_stage`` reads top to bottom: batch -> forward -> loss ->
backward -> step -> log, then evaluation.

Everything else a run does around the steps is an event handler (``Loop.add_callback``):
the weight average (``training.average``), model selection and stage 1's early stop, the
collapse guard, periodic checkpoints, ``stop_after``, the time budget and the user's
``on_step``. A handler is ``callback(loop, state)``; one that returns True ends the stage
(the handlers after it on that event do not run). Events, in the order of a step:

- ``on_stage_start``: before the first step of a stage (also a resumed one);
- ``on_batch_end``: after the optimizer step;
- ``on_evaluate``: after logging, on evaluation steps (every ``eval_every`` and the last);
- ``on_step_end``: last thing of a step;
- ``on_stage_end``: after the stage's last step, whatever ended it.

``state`` holds exactly what ``checkpoint.save`` writes: counters, the step module, optimizer,
schedule, AdaMatch alignment, samplers, batches drawn ahead, stage-1 model selection,
per-stage summaries, the collapse guard's memory and the weight average.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zmdevice.config import TrainConfig
from zmdevice.errors import UserError, atomic_path
from zmdevice.training.distributed import Ranks
from zmdevice.training.stages import Stage, StepContext, StepModel

LOOKAHEAD_STEPS = 4
"""Steps whose image views are built together (see ``draw_batch``)."""
LOOKAHEAD_BYTES = 32 * 2**20
"""...as long as their float32 inputs fit in this much memory."""


@dataclass(frozen=True)
class Setup:
    """Everything a run resolves once (``run.build_setup``); read-only afterwards."""

    config: TrainConfig
    """Settings as the run trains: the modality's defaults filled in, the precision resolved
    and, with --time-budget, the planned steps."""
    plans: tuple[Stage, ...]
    """The method's stages (``stages.plan_stages(config)``); see ``stage_plans``."""
    data: Any
    """training.data.TrainData."""
    student: Any
    device: Any
    precision: Any
    """The resolved ``zmdevice.precision.Precision`` of the training steps."""
    out: Path
    soft: bool
    """Distil FM probabilities (KL) instead of hard labels."""
    freeze_embeddings: bool
    fingerprints: dict
    """Data fingerprints (``data.data_fingerprints``), checked on resume."""
    ranks: Ranks = Ranks()
    """This process's rank and the world size (``training.distributed``)."""
    budget: Any = None
    """training.budget.Budget of a --time-budget run, else None."""


class StopTraining(Exception):
    """Raised after ``stop_after`` steps once the checkpoint is written."""


def new_state(setup: Setup) -> dict:
    """The state of a run before its first step (stage 0 not yet begun)."""
    return {
        "stage_index": 0,
        "step": 0,
        "global_step": 0,
        "model": None,
        "optimizer": None,
        "scheduler": None,
        "alignment": None,
        "samplers": {},
        "ahead": [],
        "best": {},
        "stage_summaries": [],
        "guard": None,
        "average": None,
        "stopped": None,
        # Loss scaling for fp16 (a disabled scaler, a no-op, otherwise); its scale is part
        # of the state so that a resumed fp16 run steps exactly as an uninterrupted one.
        "scaler": setup.precision.grad_scaler(),
    }


def stage_plans(setup: Setup, state: dict) -> tuple[Stage, ...]:
    """The run's stages: the method's, then the distillation stage a ``distill`` collapse
    added (recorded in the guard's memory, so a resumed run has it too)."""
    from zmdevice.training.guard import plans_after_collapse

    return setup.plans + plans_after_collapse(state["guard"])


def stage_plan(setup: Setup, state: dict) -> Stage:
    """The stage in progress (the last one once the run is past its end)."""
    plans = stage_plans(setup, state)
    return plans[min(state["stage_index"], len(plans) - 1)]


def begin_stage(setup: Setup, state: dict) -> None:
    """Fresh optimizer, schedule, alignment state and samplers; KD head for stage 2."""
    from zmdevice.training.average import start_average

    plan = stage_plan(setup, state)
    config, student = setup.config, setup.student
    seed = config.seed * 1000 + state["stage_index"]
    if plan.kd_head and student.kd_head is None:
        student.attach_kd_head(seed=seed)
        student.to(setup.device)
    elif not plan.kd_head and student.kd_head is not None:
        # Distillation after a collapse (guard "distill"): the KD head has no loss left, and
        # DistributedDataParallel refuses parameters that get no gradient.
        student.kd_head = None
    scale = config.ssl_lr_scale if plan.uses_labeled and state["stage_index"] > 0 else 1.0
    state["optimizer"], state["scheduler"] = make_optimizer(
        student, config, plan.steps, setup.freeze_embeddings, scale
    )
    state["average"] = start_average(config, plan, state["stage_index"], student)
    state["alignment"] = setup.ranks.alignment(len(setup.data.classes), config.da_momentum)
    state["samplers"] = make_samplers(setup, plan, seed)
    state["best"] = {}
    state["ahead"] = []
    # Rebuilt every stage: under DDP the wrapper must see stage 2's KD head to sync it.
    state["model"] = setup.ranks.wrap(StepModel(student, setup.precision), setup.device)


def make_samplers(setup: Setup, plan: Stage, seed: int) -> dict:
    """The stage's samplers (``Stage.samplers``), seeded ``seed`` + their position."""
    from zmdevice.pipeline import Sampler

    return {
        name: Sampler(population, batch_size, seed + offset)
        for offset, (name, (population, batch_size)) in enumerate(
            plan.samplers(setup.data, setup.config).items()
        )
    }


def make_optimizer(
    student, config: TrainConfig, steps: int, freeze_embeddings: bool, lr_scale: float = 1.0
):
    """Fresh AdamW and a linear-warmup + cosine schedule (reset for every stage), its peak
    learning rates ``lr_scale`` times the configured ones."""
    groups = student.parameter_groups(
        lr_scale * config.lr,
        lr_scale * config.head_lr,
        config.weight_decay,
        freeze_word_embeddings=freeze_embeddings,
    )
    for group in groups:
        group.pop("name", None)
    # The fused kernel makes the AdamW step ~4x cheaper on CPU than the foreach one.
    device_type = next(student.parameters()).device.type
    fast = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, **fast)
    warmup = int(config.warmup * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- batches


def draw_batch(setup: Setup, state: dict, plan: Stage) -> dict:
    """The next batch: ``pool`` (into the index space), ``labeled`` (rows) and ``inputs``.

    Image views are built for several steps in one call: at 32 px the per-call cost of
    batched RandAugment and pad-crop-flip outweighs the per-image cost, and on a 2-core
    CPU it is a visible part of a step. The batches drawn but not yet trained on are kept
    in ``state["ahead"]`` and saved in checkpoints, so a resumed run trains on the same
    ones. Text batches are built one step at a time (padding is per batch).
    """
    if not state["ahead"]:
        remaining = plan.steps - state["step"]
        count = max(1, min(steps_ahead(setup, plan), remaining))
        state["ahead"] = draw_batches(setup, state["samplers"], plan, count)
    return state["ahead"].pop(0)


def steps_ahead(setup: Setup, plan: Stage) -> int:
    if setup.data.modality != "image":
        return 1
    size = setup.data.views.pixels.shape[-1]
    rows = plan.rows_per_step(setup.config)
    return max(1, min(LOOKAHEAD_STEPS, LOOKAHEAD_BYTES // (rows * 3 * size * size * 4)))


def draw_batches(setup: Setup, samplers: dict, plan: Stage, count: int) -> list[dict]:
    """``count`` consecutive batches; their views come from one ``views.batch`` call."""
    data = setup.data
    batches = [plan.draw(data, samplers) for _ in range(count)]
    groups = [plan.view_groups(data, batch) for batch in batches]
    if count == 1:
        batches[0]["inputs"] = data.views.batch(groups[0])
        return batches
    rows = [sum(len(indices) for _, indices in step) for step in groups]
    inputs = data.views.batch([group for step in groups for group in step])
    for batch, pixel_values in zip(batches, torch.split(inputs["pixel_values"], rows), strict=True):
        batch["inputs"] = {"pixel_values": pixel_values}
    return batches


# --------------------------------------------------------------------------- one step


def step_context(setup: Setup, state: dict, plan: Stage) -> StepContext:
    """What the losses of the step at ``state["step"]`` read besides the batch."""
    return StepContext(setup.data, setup.config, setup.soft, setup.device,
                       state["alignment"], state["step"], plan.steps, setup.ranks)  # fmt: skip


def train_step(state: dict, plan: Stage, batch: dict, context: StepContext, grad_clip: float,
               rng=None) -> dict:  # fmt: skip
    """Forward -> named losses -> backward -> (clip) -> optimizer and schedule step.

    ``state`` gives ``model`` (the step module), ``optimizer``, ``scheduler`` and ``scaler``;
    ``rng`` is a context for the forward pass's random numbers (``Ranks.own_rng``). Returns
    the named losses (``Stage.losses``).
    """
    with rng or contextlib.nullcontext():
        named = plan.losses(state["model"], batch, context)
    optimizer, scaler = state["optimizer"], state["scaler"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(named["loss"]).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(state["model"].parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    state["scheduler"].step()
    return named


# --------------------------------------------------------------------------- the loop

Callback = Callable[["Loop", dict], Any]
"""``callback(loop, state)``; a True result ends the stage."""


class Loop:
    """Runs stages of one ``Setup``; what happens around the steps is callbacks.

    ``log`` is the metrics log (``MetricsLog``, ``NullLog``); ``save_checkpoint(setup,
    state)`` writes the checkpoint. During a stage ``plan`` is its ``Stage``, ``values`` the
    last step's logged values and ``progress`` its progress bar.
    """

    def __init__(self, setup: Setup, log, save_checkpoint=lambda setup, state: None):
        self.setup, self.log, self.save_checkpoint = setup, log, save_checkpoint
        self.callbacks: dict[str, list[Callback]] = defaultdict(list)
        self.plan: Stage | None = None
        self.values: dict = {}
        self.progress = None

    def add_callback(self, event: str, callback: Callback) -> None:
        self.callbacks[event].append(callback)

    def trigger(self, event: str, state: dict) -> bool:
        """Run the callbacks of ``event`` in order; True (the stage ends) at the first that
        returns True."""
        return any(callback(self, state) for callback in self.callbacks[event])

    def run_stage(self, state: dict) -> None:
        """Train the current stage from ``state["step"]`` to its end or a callback's stop."""
        setup, plan = self.setup, stage_plan(self.setup, state)
        self.plan, started = plan, time.perf_counter()
        self.progress = progress_bar(setup, state, plan)
        self.trigger("on_stage_start", state)
        state["model"].train()
        while state["step"] < plan.steps:
            batch = setup.ranks.shard(plan, setup.data, draw_batch(setup, state, plan))
            context = step_context(setup, state, plan)
            rng = setup.ranks.own_rng(setup.config.seed, state["global_step"], setup.device)
            named = train_step(state, plan, batch, context, setup.config.grad_clip, rng)
            state["step"] += 1
            state["global_step"] += 1
            self.trigger("on_batch_end", state)
            self.values = self.log_step(state, named)
            if self.evaluation_due(state) and self.trigger("on_evaluate", state):
                break
            if self.trigger("on_step_end", state):
                break
        self.progress.close()
        seconds = round(time.perf_counter() - started, 1)
        state["stage_summaries"].append(
            {"stage": plan.name, "steps": state["step"], "seconds": seconds}
        )
        self.trigger("on_stage_end", state)

    def log_step(self, state: dict, named: dict) -> dict:
        """The step's named values (averaged over ranks) on the progress bar and, every
        ``log_every`` steps and at the stage's last, in metrics.jsonl."""
        values = {key: float(value.detach()) for key, value in named.items()}
        values = self.setup.ranks.mean_values(values, self.setup.device)
        self.progress.update(1)
        self.progress.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "alpha"})
        if state["step"] % self.setup.config.log_every == 0 or self.last_step(state):
            lr = state["optimizer"].param_groups[0]["lr"]
            self.log.write(state, self.plan, {**values, "lr": lr})
        return values

    def last_step(self, state: dict) -> bool:
        return state["step"] == self.plan.steps

    def evaluation_due(self, state: dict) -> bool:
        every = self.setup.config.eval_every
        return bool(every and state["step"] % every == 0) or self.last_step(state)


def progress_bar(setup: Setup, state: dict, plan: Stage):
    from tqdm import tqdm

    label = f"stage {state['stage_index'] + 1}/{len(stage_plans(setup, state))} {plan.name}"
    return tqdm(total=plan.steps, initial=state["step"], desc=label, leave=True,
                disable=None if setup.ranks.is_main else True, file=sys.stderr,
                dynamic_ncols=True)  # fmt: skip


# --------------------------------------------------------------------------- handlers


def evaluate_and_select(loop: Loop, state: dict) -> bool:
    """``on_evaluate``: evaluate and log; stage 1 keeps its best held-out weights and ends
    early (True) past ``early_stop_agreement``. Rank 0 decides for every rank."""

    def decide() -> bool:
        from zmdevice.training.evaluation import evaluate_now

        setup, plan = loop.setup, loop.plan
        results = evaluate_now(setup, plan)
        if results:
            loop.log.write(state, plan, results)
        if not plan.selects_model:
            return False
        agreement = results["heldout_agreement"]
        best = state["best"]
        if not best or agreement > best["agreement"]:
            state["best"] = {"agreement": agreement, "step": state["step"],
                             "state": cpu_state(setup.student)}  # fmt: skip
        return agreement > setup.config.early_stop_agreement and state["step"] < plan.steps

    if not loop.setup.ranks.decide(decide):
        return False
    loop.log.write(state, loop.plan, {"early_stop": True})
    return True


def restore_best(loop: Loop, state: dict) -> None:
    """``on_stage_end``: model selection continues (or finishes) from the best held-out
    weights."""
    if loop.plan.selects_model and state["best"]:
        loop.setup.student.load_state_dict(state["best"]["state"])


def save_periodically(loop: Loop, state: dict) -> None:
    """``on_step_end``: a checkpoint every ``checkpoint_every`` steps (not at a stage's end,
    where the next stage's start saves one)."""
    every = loop.setup.config.checkpoint_every
    if every and state["step"] % every == 0 and not loop.last_step(state):
        loop.save_checkpoint(loop.setup, state)


def stop_after(loop: Loop, state: dict) -> None:
    """``on_step_end``: after ``stop_after`` steps, save and raise ``StopTraining``."""
    limit = loop.setup.config.stop_after
    if limit is not None and state["global_step"] >= limit and not loop.last_step(state):
        loop.save_checkpoint(loop.setup, state)
        loop.progress.close()
        raise StopTraining(state["global_step"])


def cpu_state(model) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def out_of_memory(setup: Setup, state: dict) -> UserError:
    """The one-line error for an accelerator out-of-memory in the stage in progress."""
    plan = stage_plan(setup, state)
    fields = [*plan.batch_fields(), "eval_batch_size"]
    current = ", ".join(f"{name} = {getattr(setup.config, name)}" for name in fields)
    return UserError(
        f"out of memory on {setup.device} in stage {state['stage_index'] + 1} ({plan.name}): "
        f"lower {current} in --config"
    )


# --------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation; each also goes to
    ``tracker`` (the ``--log`` one, ``zmdevice.trackers``) when there is one."""

    def __init__(self, path: Path, keep_until: int | None = None, tracker=None):
        self.path, self.tracker = path, tracker
        lines = []
        if keep_until is not None and path.is_file():
            lines = kept_lines(path, keep_until)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
        self.handle = path.open("a", encoding="utf-8")

    def write(self, state: dict, plan: Stage, values: dict) -> None:
        record = {
            "stage": plan.name,
            "stage_index": state["stage_index"],
            "step": state["step"],
            "global_step": state["global_step"],
            **{
                key: round(value, 6) if isinstance(value, float) else value
                for key, value in values.items()
            },
        }
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tracker is not None:
            self.tracker.log_record(record)

    def close(self) -> None:
        self.handle.close()


class NullLog:
    """A metrics log that keeps nothing (the budget's probe; ranks other than 0)."""

    def write(self, state: dict, plan: Stage, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def kept_lines(path: Path, keep_until: int) -> list[str]:
    """On resume, the lines logged up to the checkpoint (later steps rerun).

    A torn last line (the process died mid-write) is dropped; a bad line elsewhere is a
    user error.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["global_step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise UserError(
                f"{path} line {number} is not a metrics record; move the file away to resume"
            ) from None
        if step <= keep_until:
            kept.append(line + "\n")
    return kept
