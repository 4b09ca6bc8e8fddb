"""What varies between methods: stage objects that carry their views and losses.

A method is a tuple of stage objects (``METHOD_STAGES``, registered here beside the stage
classes; ``config.METHODS`` keeps only what validation and help need: the names, whether the
FM is used, the stage names). ``DistillStage`` (stage 1) and ``SSLStage`` (a labeled batch
plus an optional L_u loss object and the auxiliary KD head) answer every question the loop
asks (which samplers, which views, which losses, which batch-size fields), so nothing tests
a method or stage name. ``StepModel`` is the one module a training step calls (one forward
for both heads), so the student can be wrapped whole, e.g. by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from zmdevice.config import TrainConfig
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


# --------------------------------------------------------------------------- L_u losses


class UnsupLoss:
    """L_u of the main head on unlabeled views: ``(loss, diagnostics)`` from the logits of
    the labeled weak, unlabeled weak and unlabeled strong views."""

    name: ClassVar[str]
    strong_view: ClassVar[bool] = False
    """Needs the strong view of each unlabeled sample."""
    uses_fm: ClassVar[bool] = False

    def resolve(self, config: TrainConfig) -> UnsupLoss:
        """The loss a run with ``config`` computes (itself, but for ``SettingLoss``)."""
        return self

    def __call__(self, logits_l, logits_uw, logits_us, pool, context: StepContext):
        raise NotImplementedError


@dataclass(frozen=True)
class FixMatch(UnsupLoss):
    """CE of strong views vs the weak views' confident guesses (fixed threshold)."""

    name = "fixmatch"
    strong_view = True

    def __call__(self, logits_l, logits_uw, logits_us, pool, context: StepContext):
        return fixmatch_loss(logits_uw, logits_us, context.config.threshold)


@dataclass(frozen=True)
class AdaMatch(UnsupLoss):
    """FixMatch with distribution alignment and a threshold relative to the labeled batch."""

    name = "adamatch"
    strong_view = True

    def __call__(self, logits_l, logits_uw, logits_us, pool, context: StepContext):
        threshold = context.config.threshold
        return adamatch_loss(logits_uw, logits_us, logits_l, context.alignment, threshold)


@dataclass(frozen=True)
class FMLabels(UnsupLoss):
    """The FM's labels on weak views taken as true labels (naive pseudo-labelling)."""

    name = "fm-labels"
    uses_fm = True

    def __call__(self, logits_l, logits_uw, logits_us, pool, context: StepContext):
        loss, _ = distill_loss(logits_uw, pool, context)
        return loss, {}


SSL_LOSSES = {loss.name: loss for loss in (AdaMatch(), FixMatch())}
"""The choices of the ``ssl_loss`` setting."""


@dataclass(frozen=True)
class SettingLoss(UnsupLoss):
    """Whichever of ``SSL_LOSSES`` the ``ssl_loss`` setting names (ZeroMatch's stage 2)."""

    name = "ssl_loss"

    def resolve(self, config: TrainConfig) -> UnsupLoss:
        return SSL_LOSSES[config.ssl_loss]


# --------------------------------------------------------------------------- stages


class Stage:
    """One stage of a run: its steps, samplers, views and named losses.

    Subclasses are frozen dataclasses with a ``steps`` field; the class attributes say what
    the loop and its extensions ask of a stage.
    """

    name: ClassVar[str]
    """The ``stage`` field of metrics.jsonl and the key of the budget's plan."""
    steps_field: ClassVar[str]
    """The TrainConfig field that gives its steps (the budget replaces it)."""
    selects_model: ClassVar[bool] = False
    """Keeps the weights that agree most with the FM on the held-out slice (stage 1)."""
    uses_labeled: ClassVar[bool] = False
    """Trains on labeled batches (what the collapse guard and the weight average watch)."""
    kd_head = False
    """Attaches the auxiliary KD head."""
    steps: int

    def resolve(self, config: TrainConfig) -> Stage:
        """This stage as ``config`` runs it: its steps (and, for SSL, its L_u) settled."""
        return dataclasses.replace(self, steps=getattr(config, self.steps_field))

    def with_steps(self, steps: int) -> Stage:
        return dataclasses.replace(self, steps=steps)

    @property
    def uses_pool(self) -> bool:
        """Draws unlabeled pool samples."""
        return True

    @property
    def uses_fm(self) -> bool:
        """Reads the FM's pseudo-labels."""
        return True

    def batch_fields(self) -> list[str]:
        """The TrainConfig batch sizes of a step of this stage (named on out-of-memory)."""
        raise NotImplementedError

    def samplers(self, data, config: TrainConfig) -> dict[str, tuple[int, int]]:
        """Sampler name -> (population, batch size); the seed offset is the order here."""
        raise NotImplementedError

    def rows_per_step(self, config: TrainConfig) -> int:
        raise NotImplementedError

    def draw(self, data, samplers: dict) -> dict:
        """Indices of one step: ``pool`` (into the index space) and ``labeled`` (rows)."""
        raise NotImplementedError

    def view_groups(self, data, batch: dict) -> list[tuple[str, Any]]:
        """The (view, indices) groups of one forward pass, in the order ``losses`` slices."""
        raise NotImplementedError

    def losses(self, model: StepModel, batch: dict, context: StepContext) -> dict:
        """Forward pass and the named losses of one step: ``{"loss", "sup", "unsup", ...}``."""
        raise NotImplementedError


@dataclass(frozen=True)
class DistillStage(Stage):
    """Stage 1: the main head distils the FM on weak views of the pool (L_KD)."""

    steps: int = 0
    name = "kd"
    steps_field = "kd_steps"
    selects_model = True

    def batch_fields(self) -> list[str]:
        return ["kd_batch_size"]

    def samplers(self, data, config: TrainConfig) -> dict[str, tuple[int, int]]:
        return {"pool": (len(data.kd_train), config.kd_batch_size)}

    def rows_per_step(self, config: TrainConfig) -> int:
        return config.kd_batch_size

    def draw(self, data, samplers: dict) -> dict:
        return {"pool": data.kd_train[samplers["pool"].next()]}

    def view_groups(self, data, batch: dict) -> list[tuple[str, Any]]:
        return [("weak", batch["pool"])]

    def losses(self, model: StepModel, batch: dict, context: StepContext) -> dict:
        logits, _ = model(to_device(batch["inputs"], context.device))
        kd, diagnostics = distill_loss(logits, batch["pool"], context)
        return {"loss": kd, "kd": kd.detach(), "kd_agreement": diagnostics["accuracy"]}


@dataclass(frozen=True)
class SSLStage(Stage):
    """A labeled batch: L_s + lambda_u L_u (``unsup``), + alpha_t lambda_p L_KD2 with
    ``kd_head`` (stage 2 of ZeroMatch)."""

    steps: int = 0
    unsup: UnsupLoss | None = None
    """L_u of the main head, or None (L_s alone, or with the KD head only)."""
    kd_head: bool = False
    """Attach the auxiliary KD head and add alpha_t * lambda_p * L_KD2."""
    name = "ssl"
    steps_field = "ssl_steps"
    uses_labeled = True

    def resolve(self, config: TrainConfig) -> Stage:
        unsup = self.unsup.resolve(config) if self.unsup is not None else None
        return dataclasses.replace(self, steps=config.ssl_steps, unsup=unsup)

    @property
    def uses_pool(self) -> bool:
        """Draws unlabeled pool samples (for an L_u or the KD head)."""
        return self.unsup is not None or self.kd_head

    @property
    def uses_fm(self) -> bool:
        return self.kd_head or (self.unsup is not None and self.unsup.uses_fm)

    @property
    def strong_view(self) -> bool:
        return self.unsup is not None and self.unsup.strong_view

    def batch_fields(self) -> list[str]:
        return ["labeled_batch_size"] + (["unlabeled_batch_size"] if self.uses_pool else [])

    def samplers(self, data, config: TrainConfig) -> dict[str, tuple[int, int]]:
        return {
            "labeled": (len(data.labeled_y), config.labeled_batch_size),
            "pool": (data.num_pool, config.unlabeled_batch_size),
        }

    def rows_per_step(self, config: TrainConfig) -> int:
        return config.labeled_batch_size + 2 * config.unlabeled_batch_size

    def draw(self, data, samplers: dict) -> dict:
        batch = {"labeled": samplers["labeled"].next()}
        if self.uses_pool:
            batch["pool"] = samplers["pool"].next()
        return batch

    def view_groups(self, data, batch: dict) -> list[tuple[str, Any]]:
        """Labeled weak, then unlabeled weak (L_u or KD head), then unlabeled strong."""
        groups = [("weak", data.labeled_index[batch["labeled"]])]
        if self.uses_pool:
            groups.append(("weak", batch["pool"]))
        if self.strong_view:
            groups.append(("strong", batch["pool"]))
        return groups

    def losses(self, model: StepModel, batch: dict, context: StepContext) -> dict:
        """L_s + lambda_u L_u (+ alpha lambda_p L_KD2) from one concatenated forward pass.

        The pass covers (labeled weak, unlabeled weak, unlabeled strong), so BatchNorm sees
        all views together, as in the reference code.
        """
        data, config, device = context.data, context.config, context.device
        labeled, pool = batch["labeled"], batch.get("pool")
        n_l = len(labeled)
        n_u = len(pool) if self.uses_pool else 0
        logits, kd_logits = model(
            to_device(batch["inputs"], device), kd_rows=n_l + n_u if self.kd_head else 0
        )
        logits_l, logits_uw = logits[:n_l], logits[n_l : n_l + n_u]
        logits_us = logits[n_l + n_u :]

        sup, _ = hard_label_ce(logits_l, data.labeled_y[labeled].to(device))
        named = {"sup": sup.detach()}
        loss = sup
        if self.unsup is not None:
            unsup, diagnostics = self.unsup(logits_l, logits_uw, logits_us, pool, context)
            loss = loss + config.lambda_u * unsup
            named["unsup"] = unsup.detach()
            if "mask" in diagnostics:
                named.update(mask_diagnostics(diagnostics, data, pool, device))
        if self.kd_head:
            alpha = alpha_ramp(context.step, context.steps) if config.alpha == "ramp" else 1.0
            kd = kd_head_loss(kd_logits, labeled, pool, context)
            loss = loss + alpha * config.lambda_p * kd
            named["kd"] = kd.detach()
            named["alpha"] = torch.tensor(alpha)
        named["loss"] = loss
        return named


# --------------------------------------------------------------------------- methods

METHOD_STAGES: dict[str, tuple[Stage, ...]] = {
    "zeromatch": (DistillStage(), SSLStage(unsup=SettingLoss(), kd_head=True)),
    "kd": (DistillStage(),),
    "supervised": (SSLStage(),),
    "fixmatch": (SSLStage(unsup=FixMatch()),),
    "adamatch": (SSLStage(unsup=AdaMatch()),),
    "naive-pl": (SSLStage(unsup=FMLabels()),),
}
"""Every --method as its stages (steps and ``ssl_loss`` settled by ``plan_stages``); the
names, summaries and ``uses_fm`` of ``config.METHODS`` agree (tests/test_train.py). A new
method that combines existing losses is one entry here and one there."""


def plan_stages(config: TrainConfig) -> tuple[Stage, ...]:
    """The stages of ``config.method``, with resolved settings."""
    return tuple(stage.resolve(config) for stage in METHOD_STAGES[config.method])


def to_device(inputs: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}


def distill_loss(logits, pool_idx, context: StepContext):
    """L_KD: CE vs FM hard labels, or (beyond the paper) KL to FM probabilities."""
    data = context.data
    if context.soft:
        targets = data.fm_probs[pool_idx].to(logits.device)
        return soft_label_kl(logits, targets, context.config.temperature)
    return hard_label_ce(logits, data.fm_label[pool_idx].to(logits.device))


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
