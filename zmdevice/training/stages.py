"""What varies between methods: the stages of a run, each knowing its views and losses.

``plan_stages`` turns a method of ``config.METHODS`` into ``StagePlan``s. A plan answers
every question the loop asks (which samplers, which views, which losses, which batch-size
fields), so nothing else tests a method or stage name. ``StepModel`` is the one module a
training step calls (one forward for both heads), so the student can be wrapped whole,
e.g. by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zmdevice.config import METHODS, TrainConfig
from zmdevice.losses import (
    DistributionAlignment,
    adamatch_loss,
    alpha_ramp,
    fixmatch_loss,
    hard_label_ce,
    soft_label_kl,
)
from zmdevice.training.distributed import Ranks


class StepModel(nn.Module):
    """The student as a training step sees it: main logits and, if attached, KD logits.

    ``forward(inputs, kd_rows)`` runs the backbone once; the KD head reads the features of
    the first ``kd_rows`` rows (the weak views; strong views are not distilled). The network
    runs under ``precision``'s autocast (a ``zmdevice.precision.Precision``; None = fp32);
    the logits come back float32, so every loss is computed in fp32.
    """

    def __init__(self, student, precision=None):
        super().__init__()
        self.student = student
        self.precision = precision

    def forward(self, inputs: dict, kd_rows: int = 0):
        with self.precision.autocast() if self.precision else contextlib.nullcontext():
            features = self.student.features(**inputs)
            logits = self.student.head(features)
            kd_logits = self.student.kd_head(features[:kd_rows]) if kd_rows else None
        return logits.float(), None if kd_logits is None else kd_logits.float()


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run: its steps, samplers, views and named losses.

    ``kind`` is 'kd' (stage 1: the main head distils the FM on weak views of the pool) or
    'ssl' (a labeled batch: L_s + lambda_u L_u, + alpha_t lambda_p L_KD2 with ``kd_head``).
    """

    kind: str
    """kd or ssl; also the ``stage`` field of metrics.jsonl."""
    steps: int
    """Optimizer steps of this stage."""
    unsup: str | None = None
    """L_u of the main head: adamatch, fixmatch, fm-labels (naive-pl) or None."""
    kd_head: bool = False
    """Attach the auxiliary KD head and add alpha_t * lambda_p * L_KD2 (stage 2)."""

    @property
    def name(self) -> str:
        return self.kind

    @property
    def selects_model(self) -> bool:
        """Stage 1 keeps the weights that agree most with the FM on the held-out slice."""
        return self.kind == "kd"

    @property
    def uses_labeled(self) -> bool:
        return self.kind == "ssl"

    @property
    def uses_pool(self) -> bool:
        """Draws unlabeled pool samples (stage 1, an L_u or the KD head)."""
        return self.kind == "kd" or self.unsup is not None or self.kd_head

    @property
    def strong_view(self) -> bool:
        return self.unsup in ("adamatch", "fixmatch")

    def batch_fields(self) -> list[str]:
        """The TrainConfig batch sizes of a step of this stage (named on out-of-memory)."""
        if self.kind == "kd":
            return ["kd_batch_size"]
        return ["labeled_batch_size"] + (["unlabeled_batch_size"] if self.uses_pool else [])

    def samplers(self, data, config: TrainConfig) -> dict[str, tuple[int, int]]:
        """Sampler name -> (population, batch size); the seed offset is the order here."""
        if self.kind == "kd":
            return {"pool": (len(data.kd_train), config.kd_batch_size)}
        return {
            "labeled": (len(data.labeled_y), config.labeled_batch_size),
            "pool": (data.num_pool, config.unlabeled_batch_size),
        }

    def rows_per_step(self, config: TrainConfig) -> int:
        if self.kind == "kd":
            return config.kd_batch_size
        return config.labeled_batch_size + 2 * config.unlabeled_batch_size

    def draw(self, data, samplers: dict) -> dict:
        """Indices of one step: ``pool`` (into the index space) and ``labeled`` (rows)."""
        if self.kind == "kd":
            return {"pool": data.kd_train[samplers["pool"].next()]}
        batch = {"labeled": samplers["labeled"].next()}
        if self.uses_pool:
            batch["pool"] = samplers["pool"].next()
        return batch

    def view_groups(self, data, batch: dict) -> list[tuple[str, Any]]:
        """The (view, indices) groups of one forward pass, in the order ``losses`` slices.

        Stage 1: weak views of pool samples. Otherwise labeled weak, then unlabeled weak
        (L_u or KD head), then unlabeled strong (FixMatch / AdaMatch).
        """
        if self.kind == "kd":
            return [("weak", batch["pool"])]
        groups = [("weak", data.labeled_index[batch["labeled"]])]
        if self.uses_pool:
            groups.append(("weak", batch["pool"]))
        if self.strong_view:
            groups.append(("strong", batch["pool"]))
        return groups

    def losses(self, model: StepModel, batch: dict, context: StepContext) -> dict:
        """Forward pass and the named losses of one step: ``{"loss", "sup", "unsup", ...}``."""
        if self.kind == "kd":
            return distill_step(model, batch, context)
        return ssl_step(self, model, batch, context)


@dataclass
class StepContext:
    """What the losses read besides the batch: data, settings, AdaMatch state, step."""

    data: Any
    config: TrainConfig
    soft: bool
    device: Any
    alignment: DistributionAlignment | None
    step: int
    steps: int
    ranks: Ranks = Ranks()
    """Where this process sits when training on several (``Ranks.count_share``)."""


def plan_stages(config: TrainConfig) -> list[StagePlan]:
    """The stages of ``config.method`` (see ``config.METHODS``), with resolved settings."""
    plans = []
    for spec in METHODS[config.method].stages:
        if spec == "kd":
            plans.append(StagePlan("kd", config.kd_steps))
            continue
        unsup, _, extra = spec.removeprefix("ssl:").partition("+")
        unsup = {"none": None, "ssl_loss": config.ssl_loss}.get(unsup, unsup)
        plans.append(StagePlan("ssl", config.ssl_steps, unsup=unsup, kd_head=extra == "kd-head"))
    return plans


def to_device(inputs: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}


def distill_loss(logits, pool_idx, context: StepContext):
    """L_KD: CE vs FM hard labels, or (beyond the paper) KL to FM probabilities."""
    data = context.data
    if context.soft:
        targets = data.fm_probs[pool_idx].to(logits.device)
        return soft_label_kl(logits, targets, context.config.temperature)
    return hard_label_ce(logits, data.fm_label[pool_idx].to(logits.device))


def distill_step(model: StepModel, batch: dict, context: StepContext) -> dict:
    """Stage 1: the main head distils the FM on weak views of pool samples."""
    logits, _ = model(to_device(batch["inputs"], context.device))
    kd, diagnostics = distill_loss(logits, batch["pool"], context)
    return {"loss": kd, "kd": kd.detach(), "kd_agreement": diagnostics["accuracy"]}


def unsup_loss(plan: StagePlan, logits_l, logits_uw, logits_us, pool, context: StepContext):
    """L_u of the main head and its diagnostics (mask, pseudo_label, ...)."""
    config = context.config
    if plan.unsup == "fixmatch":
        return fixmatch_loss(logits_uw, logits_us, config.threshold)
    if plan.unsup == "adamatch":
        return adamatch_loss(logits_uw, logits_us, logits_l, context.alignment, config.threshold)
    if plan.unsup == "fm-labels":
        loss, _ = distill_loss(logits_uw, pool, context)
        return loss, {}
    raise ValueError(f"unknown L_u {plan.unsup!r}")


def ssl_step(plan: StagePlan, model: StepModel, batch: dict, context: StepContext) -> dict:
    """L_s + lambda_u L_u (+ alpha lambda_p L_KD2) from one concatenated forward pass.

    The pass covers (labeled weak, unlabeled weak, unlabeled strong), so BatchNorm sees all
    views together, as in the reference code.
    """
    data, config, device = context.data, context.config, context.device
    labeled, pool = batch["labeled"], batch.get("pool")
    n_l = len(labeled)
    n_u = len(pool) if plan.uses_pool else 0
    logits, kd_logits = model(
        to_device(batch["inputs"], device), kd_rows=n_l + n_u if plan.kd_head else 0
    )
    logits_l, logits_uw, logits_us = logits[:n_l], logits[n_l : n_l + n_u], logits[n_l + n_u :]

    sup, _ = hard_label_ce(logits_l, data.labeled_y[labeled].to(device))
    named = {"sup": sup.detach()}
    loss = sup
    if plan.unsup is not None:
        unsup, diagnostics = unsup_loss(plan, logits_l, logits_uw, logits_us, pool, context)
        loss = loss + config.lambda_u * unsup
        named["unsup"] = unsup.detach()
        if "mask" in diagnostics:
            named.update(mask_diagnostics(diagnostics, data, pool, device))
    if plan.kd_head:
        alpha = alpha_ramp(context.step, context.steps) if config.alpha == "ramp" else 1.0
        kd = kd_head_loss(kd_logits, labeled, pool, context)
        loss = loss + alpha * config.lambda_p * kd
        named["kd"] = kd.detach()
        named["alpha"] = torch.tensor(alpha)
    named["loss"] = loss
    return named


def mask_diagnostics(diagnostics: dict, data, pool, device) -> dict:
    """Mask rate and, when the pool's true labels are known, pseudo-label accuracy above
    the threshold (the collapse detector)."""
    named = {"mask_rate": diagnostics["mask_rate"]}
    if data.gold_pool is not None:
        mask = diagnostics["mask"]
        correct = (diagnostics["pseudo_label"] == data.gold_pool[pool].to(device)) & mask
        named["pl_accuracy"] = correct.sum().float() / mask.sum().clamp(min=1)
    return named


def kd_head_loss(kd_logits, labeled, pool, context: StepContext):
    """L_KD2: the KD head vs FM labels on labeled and unlabeled weak views."""
    data, device = context.data, context.device
    n_l = len(labeled)
    if context.soft:
        # Probabilities exist for pool samples only: labeled ones outside it sit out.
        in_pool = data.labeled_index[labeled] < data.num_pool
        rows = torch.cat([in_pool.nonzero().flatten(), torch.arange(n_l, n_l + len(pool))])
        targets = data.fm_probs[torch.cat([data.labeled_index[labeled][in_pool], pool])]
        kd, _ = soft_label_kl(
            kd_logits[rows.to(device)], targets.to(device), context.config.temperature
        )
        return kd * context.ranks.count_share(len(rows), device)
    fm_targets = torch.cat([data.labeled_fm[labeled], data.fm_label[pool]])
    kd, _ = hard_label_ce(kd_logits, fm_targets.to(device))
    return kd * context.ranks.count_share(int((fm_targets != -1).sum()), device)
