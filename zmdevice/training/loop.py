"""The training loop: ``Setup`` is built once, ``state`` is one plain dict (the checkpoint).

``run_stage`` reads top to bottom: batch -> forward -> loss -> backward -> step -> log, then
periodic evaluation and checkpoints. Extension is the plain ``on_step(setup, state,
values)`` callback. ``state`` holds exactly what ``checkpoint.save`` writes: counters,
model, optimizer, schedule, AdaMatch alignment, samplers, batches drawn ahead, stage-1
model selection and per-stage summaries.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zmdevice.config import TrainConfig
from zmdevice.errors import UserError, atomic_path
from zmdevice.training.distributed import Ranks
from zmdevice.training.stages import StagePlan, StepContext, StepModel, to_device

LOOKAHEAD_STEPS = 4
"""Steps whose image views are built together (see ``draw_batch``)."""
LOOKAHEAD_BYTES = 32 * 2**20
"""...as long as their float32 inputs fit in this much memory."""


@dataclass
class Setup:
    """Everything built once per run and never changed by training."""

    config: TrainConfig
    """Settings with the modality's defaults filled in."""
    plans: list[StagePlan]
    data: Any
    """training.data.TrainData."""
    student: Any
    model: StepModel
    """The student as one training-step module."""
    device: Any
    precision: Any
    """The resolved ``zmdevice.precision.Precision`` of the training steps."""
    out: Path
    soft: bool
    """Distil FM probabilities (KL) instead of hard labels."""
    freeze_embeddings: bool
    fingerprints: dict
    """Data fingerprints (``data.data_fingerprints``), checked on resume."""
    log: MetricsLog | None = None
    on_step: Any = None
    ranks: Ranks = Ranks()
    """This process's rank and the world size (``training.distributed``)."""
    budget: Any = None
    """training.budget.Budget of a --time-budget run, else None."""
    guard: Any = None
    """training.guard.CollapseGuard unless collapse_guard is off."""


class StopTraining(Exception):
    """Raised after ``stop_after`` steps once the checkpoint is written."""


def new_state(setup: Setup) -> dict:
    """The state of a run before its first step (stage 0 not yet begun)."""
    return {
        "stage_index": 0,
        "step": 0,
        "global_step": 0,
        "model": setup.student,
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


def begin_stage(setup: Setup, state: dict) -> None:
    """Fresh optimizer, schedule, alignment state and samplers; KD head for stage 2."""
    from zmdevice.pipeline import Sampler
    from zmdevice.training.average import start_average

    plan = setup.plans[state["stage_index"]]
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
    state["samplers"] = {
        name: Sampler(population, batch_size, seed + offset)
        for offset, (name, (population, batch_size)) in enumerate(
            plan.samplers(setup.data, config).items()
        )
    }
    state["best"] = {}
    state["ahead"] = []
    if setup.ranks.active:  # (re)wrap in DDP: stage 2's KD head must be synced too
        setup.model = setup.ranks.wrap(StepModel(student), setup.device)


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


def draw_batch(setup: Setup, state: dict, plan: StagePlan) -> dict:
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


def steps_ahead(setup: Setup, plan: StagePlan) -> int:
    if setup.data.modality != "image":
        return 1
    size = setup.data.views.pixels.shape[-1]
    rows = plan.rows_per_step(setup.config)
    return max(1, min(LOOKAHEAD_STEPS, LOOKAHEAD_BYTES // (rows * 3 * size * size * 4)))


def draw_batches(setup: Setup, samplers: dict, plan: StagePlan, count: int) -> list[dict]:
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


# --------------------------------------------------------------------------- the loop


def run_stage(setup: Setup, state: dict, save_checkpoint) -> None:
    """Train the current stage from ``state["step"]`` to its end (or stage 1's early stop).

    ``save_checkpoint(setup, state)`` writes the checkpoint (``checkpoint.save``).
    """
    from tqdm import tqdm

    from zmdevice.training.average import update_average

    config, plan = setup.config, setup.plans[state["stage_index"]]
    optimizer, scheduler = state["optimizer"], state["scheduler"]
    label = f"stage {state['stage_index'] + 1}/{len(setup.plans)} {plan.name}"
    progress = tqdm(total=plan.steps, initial=state["step"], desc=label, leave=True,
                    disable=None if setup.ranks.is_main else True, file=sys.stderr,
                    dynamic_ncols=True)  # fmt: skip
    started = time.perf_counter()
    if setup.guard is not None:
        setup.guard.begin(setup, state, plan)
    setup.model.train()
    ranks = setup.ranks
    while state["step"] < plan.steps:
        batch = ranks.shard(plan, setup.data, draw_batch(setup, state, plan))
        context = StepContext(setup.data, config, setup.soft, setup.device,
                              state["alignment"], state["step"], plan.steps, ranks)  # fmt: skip
        with ranks.own_rng(config.seed, state["global_step"], setup.device):
            named = plan.losses(setup.model, batch, context)
        optimizer.zero_grad(set_to_none=True)
        scaler = state["scaler"]
        scaler.scale(named["loss"]).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(setup.model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if state["average"] is not None:
            update_average(state["average"], setup.student)
        state["step"] += 1
        state["global_step"] += 1

        values = {key: float(value.detach()) for key, value in named.items()}
        values = ranks.mean_values(values, setup.device)
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "alpha"})
        last = state["step"] == plan.steps
        if state["step"] % config.log_every == 0 or last:
            setup.log.write(state, plan, {**values, "lr": optimizer.param_groups[0]["lr"]})
        evaluate = (config.eval_every and state["step"] % config.eval_every == 0) or last
        if evaluate and state["average"] is not None and ranks.is_main:
            evaluate_average(setup, state, plan)
        if evaluate and ranks.decide(lambda: evaluate_and_select(setup, state, plan)):
            setup.log.write(state, plan, {"early_stop": True})
            break
        if evaluate and setup.guard is not None and setup.guard.check(setup, state, plan):
            break
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 and not last:
            save_checkpoint(setup, state)
        if setup.on_step is not None:
            setup.on_step(setup, state, values)
        if setup.budget is not None and setup.budget.out_of_time(setup, state, plan):
            break
        if config.stop_after is not None and state["global_step"] >= config.stop_after and not last:
            save_checkpoint(setup, state)
            progress.close()
            raise StopTraining(state["global_step"])
    progress.close()
    seconds = round(time.perf_counter() - started, 1)
    state["stage_summaries"].append(
        {"stage": plan.name, "steps": state["step"], "seconds": seconds}
    )


def evaluate_and_select(setup: Setup, state: dict, plan: StagePlan) -> bool:
    """Evaluate, log, keep the best stage-1 weights; True when stage 1 may stop early."""
    results = evaluate_now(setup, plan)
    if results:
        setup.log.write(state, plan, results)
    if not plan.selects_model:
        return False
    agreement = results["heldout_agreement"]
    best = state["best"]
    if not best or agreement > best["agreement"]:
        state["best"] = {"agreement": agreement, "step": state["step"],
                         "state": cpu_state(setup.student)}  # fmt: skip
    return agreement > setup.config.early_stop_agreement and state["step"] < plan.steps


def evaluate_average(setup: Setup, state: dict, plan: StagePlan) -> None:
    """Log the averaged weights' test accuracy (``training.average``; with --test only)."""
    from zmdevice.training.average import averaged_weights

    if setup.data.test_index is None:
        return
    with averaged_weights(setup.student, state["average"]):
        results = evaluate_now(setup, plan)
    setup.log.write(state, plan, {f"average_{key}": value for key, value in results.items()})


def cpu_state(model) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def out_of_memory(setup: Setup, state: dict) -> UserError:
    """The one-line error for an accelerator out-of-memory in the stage in progress."""
    plan = setup.plans[min(state["stage_index"], len(setup.plans) - 1)]
    fields = [*plan.batch_fields(), "eval_batch_size"]
    current = ", ".join(f"{name} = {getattr(setup.config, name)}" for name in fields)
    return UserError(
        f"out of memory on {setup.device} in stage {state['stage_index'] + 1} ({plan.name}): "
        f"lower {current} in --config"
    )


# --------------------------------------------------------------------------- evaluation


def predict(student, data, indices, batch_size: int, device):
    """Main-head predictions [N] (int64, CPU) on clean views, in eval mode."""
    was_training = student.training
    student.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            inputs = to_device(data.views.batch([("clean", chunk)]), device)
            out.append(student(**inputs).argmax(dim=1).cpu())
    student.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate_now(setup: Setup, plan: StagePlan) -> dict:
    """Held-out agreement with the FM (stage 1) and test accuracy (when --test is given)."""
    data, size = setup.data, setup.config.eval_batch_size
    results = {}
    if plan.selects_model:
        predicted = predict(setup.student, data, data.holdout, size, setup.device)
        results["heldout_agreement"] = float(
            (predicted == data.fm_label[data.holdout]).float().mean()
        )
        if data.gold_pool is not None:
            gold = data.gold_pool[data.holdout]
            results["heldout_gold_accuracy"] = float((predicted == gold).float().mean())
    if data.test_index is not None:
        predicted = predict(setup.student, data, data.test_index, size, setup.device)
        results["test_accuracy"] = float((predicted == data.test_y).float().mean())
    return results


def recalibration_batches(setup: Setup) -> int:
    """How many batches the BatchNorm recalibration before saving reads (0: none)."""
    config, data = setup.config, setup.data
    if data.modality != "image":
        return 0
    return min(config.bn_recalibration_batches, -(-data.num_pool // config.eval_batch_size))


def recalibrate(setup: Setup) -> int:
    """Re-estimate BatchNorm statistics on clean unlabeled images (no labels)."""
    from zmdevice.students import recalibrate_batchnorm

    config, data = setup.config, setup.data
    if recalibration_batches(setup) == 0:
        return 0
    generator = torch.Generator().manual_seed(config.seed + 2)
    order = torch.randperm(data.num_pool, generator=generator)
    size = config.eval_batch_size
    batches = (
        to_device(data.views.batch([("clean", order[start : start + size])]), setup.device)
        for start in range(0, len(order), size)
    )
    return recalibrate_batchnorm(
        setup.student, batches, max_batches=config.bn_recalibration_batches
    )


def final_test_report(setup: Setup) -> dict:
    """Accuracy, macro-F1 and per-class numbers of the saved model on --test (if given)."""
    from zmdevice.metrics import classification_report

    data = setup.data
    if data.test_index is None:
        return {}
    size = setup.config.eval_batch_size
    predicted = predict(setup.student, data, data.test_index, size, setup.device)
    report = classification_report(data.test_y.numpy(), predicted.numpy(), data.classes)
    return {
        "test_accuracy": float(report["accuracy"]),
        "test_macro_f1": float(report["macro_f1"]),
        "test_report": report,
    }


# --------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = path
        lines = []
        if keep_until is not None and path.is_file():
            lines = kept_lines(path, keep_until)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
        self.handle = path.open("a", encoding="utf-8")

    def write(self, state: dict, plan: StagePlan, values: dict) -> None:
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

    def close(self) -> None:
        self.handle.close()


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
