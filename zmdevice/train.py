"""`zmdevice train`: ZeroMatch (stage 1 KD, stage 2 SSL + auxiliary KD head) and baselines.

docs/method.md, restated as code. A run is a list of stages; every stage goes through the same
loop (``run_stage``: batch -> forward -> loss -> backward -> step -> log). What differs
between methods is only the list of stages and which named losses a stage adds up:

=============  ==============================================================
``zeromatch``  stage 1 ``kd`` (CE vs FM labels on all samples, model selection on a
               held-out slice), then stage 2 ``ssl``: L_s + L_u + alpha_t * lambda_p * L_KD2
``kd``         stage 1 only
``supervised`` L_s on the labeled set only
``fixmatch``   L_s + FixMatch L_u (no FM)
``adamatch``   L_s + AdaMatch L_u (no FM)
``naive-pl``   L_s + CE of the main head vs FM labels on unlabeled data (FM labels
               treated as true labels)
=============  ==============================================================

Single-stage methods run ``--ssl-steps`` steps, by default the sum of the student's
stage-1 and stage-2 defaults (the same budget as ZeroMatch).

Where this departs from the reference runs, on purpose (each a ``TrainHyper`` field):
AdaMatch's EMA momentum is 0.99, not 0.999 (short CPU stages, see ``MODALITY_DEFAULTS``);
BatchNorm statistics are re-estimated on clean unlabeled images before saving (docs/measured.md).

Outputs in ``models/NAME/`` (docs/design.md): the student (``save_student``),
``train_config.toml`` (rerun with ``--config``), ``metrics.jsonl``, ``report.md``,
``curves.png`` and ``checkpoints/last.pt`` for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmdevice.config import TrainConfig
from zmdevice.errors import UserError, atomic_path, write_text_atomic

FM_METHODS = ("zeromatch", "kd", "naive-pl")
"""Methods that need the foundation model's pseudo-labels."""

CHECKPOINT_FILE = "checkpoints/last.pt"


# --------------------------------------------------------------------------- hyper-parameters


@dataclass
class TrainHyper:
    """Hyper-parameters of a run (``extra`` keys of ``TrainConfig`` / ``--config`` file).

    Defaults are the CPU settings of docs/measured.md; ``MODALITY_DEFAULTS`` holds where text
    differs, ``hyper_for`` applies both.
    """

    image_size: int | None = None
    """Image side S in pixels; None = the student preset's (32 for mobilenet_v3_small)."""
    max_length: int | None = None
    """Longest token sequence; None = the student preset's (40 for distilbert)."""
    kd_batch_size: int = 64
    """Stage-1 batch (all samples, weak view)."""
    labeled_batch_size: int = 16
    """Stage-2 labeled batch."""
    unlabeled_batch_size: int = 64
    """Stage-2 unlabeled batch (each sample gives a weak and a strong view)."""
    lr: float = 2e-3
    """Peak learning rate of the backbone (AdamW)."""
    head_lr: float = 2e-3
    """Peak learning rate of the heads."""
    weight_decay: float = 5e-4
    """AdamW weight decay (matrices and kernels only)."""
    warmup: float = 0.05
    """Fraction of each stage's steps spent warming up linearly, then cosine to 0."""
    ssl_loss: str = "adamatch"
    """L_u of zeromatch: adamatch (as the paper) or fixmatch."""
    threshold: float = 0.95
    """FixMatch confidence threshold / AdaMatch relative threshold."""
    da_momentum: float = 0.99
    """EMA momentum of AdaMatch's class distributions (paper/USB: 0.999, see below)."""
    lambda_u: float = 1.0
    """Weight of L_u."""
    lambda_p: float = 1.0
    """Weight of L_KD2 (the paper's lambda_p)."""
    alpha: str = "ramp"
    """alpha_t schedule: ramp (0 -> 1 linearly over stage 2) or constant (1.0, ablation)."""
    temperature: float = 1.0
    """Temperature of the soft-label KL (with soft_labels)."""
    holdout_fraction: float = 0.05
    """Share of the training samples held out of stage 1 for model selection."""
    holdout_max: int = 2000
    """Cap on the held-out slice (keeps its evaluation cheap)."""
    early_stop_agreement: float = 0.9999
    """Stage 1 stops once held-out agreement with the pseudo-labels exceeds this."""
    eval_every: int = 50
    """Steps between held-out / test evaluations (0 = only at the end of a stage)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0 = only at stage ends)."""
    ema_decay: float = 0.0
    """Weight EMA decay for evaluation and the saved model (0 = off, as the paper)."""
    grad_clip: float = 0.0
    """Max gradient norm (0 = no clipping)."""
    freeze_word_embeddings: bool | None = None
    """Text: keep the word-embedding matrix fixed; None = on CPU only (docs/measured.md)."""
    eval_batch_size: int = 256
    """Batch of evaluation and BatchNorm recalibration passes."""
    bn_recalibration_batches: int = 40
    """Clean unlabeled batches that re-estimate BatchNorm statistics before saving (0 = off)."""
    image_cache_gb: float = 1.0
    """Decoded training images beyond this size live in a memory-mapped file (in --out)."""
    threads: int | None = None
    """CPU threads for torch; None = the cores this process may run on."""
    stop_after: int | None = None
    """Stop the whole run after this many steps in total (to split a run; then --resume)."""

    def __post_init__(self):
        if self.ssl_loss not in ("adamatch", "fixmatch"):
            raise UserError(f"ssl_loss must be adamatch or fixmatch, got '{self.ssl_loss}'")
        if self.alpha not in ("ramp", "constant"):
            raise UserError(f"alpha must be ramp or constant, got '{self.alpha}'")
        for name in (
            "kd_batch_size",
            "labeled_batch_size",
            "unlabeled_batch_size",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UserError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# Why da_momentum 0.99 and not USB's 0.999: 0.999 averages over ~1,000 steps, longer than a
# whole CPU stage 2 (150-500 steps). After stage 1, p_model starts at the student's first
# batch, i.e. the FM's skewed class distribution, and then lags behind the student, so
# alignment keeps boosting classes the FM under-predicted. Fashion-MNIST, 40 labels,
# EfficientNet-Lite0 labels, 500 + 500 steps: 65.4% (0.999, 3 seeds) vs 69.6% (0.99, 2 seeds).
MODALITY_DEFAULTS = {
    "image": {},
    "text": dict(
        kd_batch_size=32,
        labeled_batch_size=16,
        unlabeled_batch_size=16,
        lr=1e-4,
        head_lr=1e-3,
        weight_decay=0.01,
        warmup=0.1,
        grad_clip=1.0,
    ),
}
"""Where text differs from the image defaults of ``TrainHyper`` (docs/measured.md)."""

DEFAULT_STEPS = {"image": (500, 500), "text": (150, 150)}
"""(stage-1, stage-2) steps per modality when --kd-steps / --ssl-steps are not given."""


def hyper_for(modality: str, extra: dict) -> TrainHyper:
    """The modality's defaults, overridden by ``extra``; unknown keys are a user error."""
    known = {f.name for f in dataclasses.fields(TrainHyper)}
    unknown = sorted(set(extra) - known - {"classes", "gold_unlabeled"})
    if unknown:
        raise UserError(
            f"unknown training setting(s) {', '.join(unknown)} in the config file; "
            f"known: {', '.join(sorted(known))}"
        )
    values = {**MODALITY_DEFAULTS[modality], **{k: v for k, v in extra.items() if k in known}}
    return TrainHyper(**values)


@dataclass
class StagePlan:
    """One stage of a run: which losses it adds up and for how many steps."""

    name: str
    """kd (stage 1) or ssl (everything with a labeled batch)."""
    steps: int
    """Optimizer steps of this stage."""
    unsup: str | None = None
    """L_u of the main head: adamatch, fixmatch, fm-labels (naive-pl) or None."""
    kd_head: bool = False
    """Stage 2 of zeromatch: attach the KD head and add alpha_t * lambda_p * L_KD2."""


def plan_stages(method: str, kd_steps: int, ssl_steps: int, ssl_loss: str) -> list[StagePlan]:
    """The stages of a method (module docstring)."""
    if method == "zeromatch":
        return [
            StagePlan("kd", kd_steps),
            StagePlan("ssl", ssl_steps, unsup=ssl_loss, kd_head=True),
        ]
    if method == "kd":
        return [StagePlan("kd", kd_steps)]
    unsup = {"supervised": None, "fixmatch": "fixmatch", "adamatch": "adamatch"}
    if method == "naive-pl":
        return [StagePlan("ssl", ssl_steps, unsup="fm-labels")]
    return [StagePlan("ssl", ssl_steps, unsup=unsup[method])]


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Everything the loop reads, indexed in one space: [unlabeled pool | extra samples].

    Index i < ``num_pool`` is the i-th unlabeled sample; labeled samples whose id is not
    in the pool (and test samples) follow. ``views`` builds model inputs for any indices.
    """

    classes: list[str]
    modality: str
    num_pool: int
    views: Any
    """pipeline.ImageViews or pipeline.TextViews over the whole index space."""
    fm_label: Any
    """int64 [num_pool]: the FM's hard label of each pool sample."""
    fm_probs: Any
    """float32 [num_pool, C] FM probabilities (soft labels), or None."""
    labeled_index: Any
    """int64 [N_l]: index of each labeled sample in the index space."""
    labeled_y: Any
    """int64 [N_l]: true labels."""
    labeled_fm: Any
    """int64 [N_l]: FM labels of the labeled samples (-1 where the file has none)."""
    gold_pool: Any = None
    """int64 [num_pool] labels the unlabeled table happens to carry (diagnostics only)."""
    holdout: Any = None
    """int64 indices of pool samples held out of stage 1 (model selection)."""
    kd_train: Any = None
    """int64 indices of pool samples stage 1 trains on."""
    test_index: Any = None
    """int64 [N_t] indices of test samples, or None."""
    test_y: Any = None
    """int64 [N_t] test labels."""
    fingerprint: str = ""


def load_data(config: TrainConfig, hyper: TrainHyper, needs_fm: bool):
    """Read labeled, unlabeled, pseudo-label and test files and check they fit together.

    Returns:
        (classes, labeled dataset, unlabeled dataset, PseudoLabels or None, test or None).
    """
    from zmdevice.data import open_dataset

    labeled = open_dataset(config.labeled, require_labels=True)
    unlabeled = open_dataset(config.unlabeled, modality=labeled.modality)
    if unlabeled.modality != labeled.modality:
        raise UserError(
            f"--unlabeled {config.unlabeled} holds {unlabeled.modality} data but --labeled "
            f"{config.labeled} holds {labeled.modality} data"
        )
    pseudo = None
    if needs_fm:
        if config.pseudo_labels is None:
            raise UserError(
                f"--method {config.method} needs --pseudo-labels (a file from `zmdevice label`); "
                "use --method supervised, fixmatch or adamatch to train without one"
            )
        from zmdevice.pseudolabels import read_pseudolabels

        if not Path(config.pseudo_labels).is_file():
            raise UserError(f"--pseudo-labels {config.pseudo_labels} does not exist")
        pseudo = read_pseudolabels(config.pseudo_labels, classes=hyper_classes(config))
        pseudo.check_fingerprint(unlabeled.fingerprint(), allow_partial=config.allow_partial)
        classes = pseudo.classes
    else:
        classes = hyper_classes(config) or sorted(set(labeled.labels))
    test = None
    if config.test is not None:
        test = open_dataset(config.test, modality=labeled.modality, require_labels=True)
    return classes, labeled, unlabeled, pseudo, test


def hyper_classes(config: TrainConfig) -> list[str] | None:
    """An explicit class list (``classes`` in the config file), else None."""
    classes = config.extra.get("classes")
    if classes is None:
        return None
    from zmdevice.data import load_classes

    return load_classes(",".join(classes) if isinstance(classes, list) else classes).names


def build_data(
    config, hyper, student, classes, labeled, unlabeled, pseudo, test, seed, out=None
) -> TrainData:
    """Join everything by id, cache inputs once, split off the stage-1 held-out slice."""
    import numpy as np
    import torch

    from zmdevice.data import ClassList, label_indices

    class_list = ClassList(names=list(classes), prompts={})
    labeled_y = label_indices(labeled, class_list)
    pool_ids = list(unlabeled.ids)
    pool_rows = list(range(len(pool_ids)))
    gold_pool = gold_labels(config, unlabeled, class_list)
    fm_label = fm_probs = None
    labeled_fm = torch.full((len(labeled),), -1, dtype=torch.long)
    if pseudo is not None:
        selected = pseudo.select(pool_ids, allow_partial=config.allow_partial)
        if len(selected) < len(pool_ids):  # --allow-partial: keep the covered ids only
            covered = set(selected.ids)
            pool_rows = [i for i, sample_id in enumerate(pool_ids) if sample_id in covered]
            pool_ids = [pool_ids[i] for i in pool_rows]
            if gold_pool is not None:
                gold_pool = gold_pool[pool_rows]
        fm_label = torch.from_numpy(selected.label.astype(np.int64))
        if config.soft_labels:
            fm_probs = torch.from_numpy(selected.dense_probs())
        by_id = {sample_id: i for i, sample_id in enumerate(pseudo.ids)}
        for row, sample_id in enumerate(labeled.ids):
            key = pool_key(sample_id, labeled, by_id)
            if key is not None:
                labeled_fm[row] = int(pseudo.label[by_id[key]])

    # One index space: the pool, then labeled samples that are not in it, then test.
    position = {sample_id: i for i, sample_id in enumerate(pool_ids)}
    sources = [(unlabeled, row) for row in pool_rows]
    labeled_index = []
    for row, sample_id in enumerate(labeled.ids):
        key = pool_key(sample_id, labeled, position)
        if key is not None:
            labeled_index.append(position[key])
        else:
            labeled_index.append(len(sources))
            sources.append((labeled, row))
    test_index = test_y = None
    if test is not None:
        test_index = torch.arange(len(sources), len(sources) + len(test))
        sources += [(test, row) for row in range(len(test))]
        test_y = torch.from_numpy(label_indices(test, class_list))

    views = make_views(student, sources, hyper, seed, out)
    num_pool = len(pool_ids)
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(num_pool, generator=generator)
    num_holdout = min(max(1, round(hyper.holdout_fraction * num_pool)), hyper.holdout_max)
    return TrainData(
        classes=list(classes),
        modality=student.modality,
        num_pool=num_pool,
        views=views,
        fm_label=fm_label,
        fm_probs=fm_probs,
        labeled_index=torch.tensor(labeled_index, dtype=torch.long),
        labeled_y=torch.from_numpy(labeled_y),
        labeled_fm=labeled_fm,
        gold_pool=gold_pool,
        holdout=order[:num_holdout].sort().values,
        kd_train=order[num_holdout:].sort().values,
        test_index=test_index,
        test_y=test_y,
        fingerprint=unlabeled.fingerprint(),
    )


def pool_key(sample_id: str, labeled, known: dict) -> str | None:
    """The id under which a labeled sample appears in the pool (or the label file), or None.

    Ids match as they are; a labeled image folder's ``<class>/name.png`` also matches the
    pool's ``name.png`` (labeled examples are drawn from the pool, as in the paper).
    """
    if sample_id in known:
        return sample_id
    if labeled.modality == "image" and "/" in sample_id:
        stripped = sample_id.split("/", 1)[1]
        if stripped in known:
            return stripped
    return None


def gold_labels(config: TrainConfig, unlabeled, class_list):
    """True labels of the pool, for diagnostics only (never trained on), or None.

    From ``gold_unlabeled`` in the config (a labeled table or folder with the pool's ids),
    else from the unlabeled table's own label column when it has one.
    """
    import torch

    from zmdevice.data import open_dataset

    known = set(class_list.names)
    gold_path = config.extra.get("gold_unlabeled")
    if gold_path is None:
        if unlabeled.labels is None or not set(unlabeled.labels) <= known:
            return None
        return torch.tensor([class_list.names.index(name) for name in unlabeled.labels])
    gold = open_dataset(Path(gold_path), require_labels=True)
    by_id = dict(zip(gold.ids, gold.labels, strict=True))
    missing = [sample_id for sample_id in unlabeled.ids if sample_id not in by_id]
    if missing:
        raise UserError(
            f"gold_unlabeled {gold_path} lacks {len(missing)} ids of --unlabeled "
            f"(e.g. {missing[0]!r}); give the pool's true labels or drop gold_unlabeled"
        )
    lookup = {name: i for i, name in enumerate(class_list.names)}
    return torch.tensor([lookup.get(by_id[sample_id], -1) for sample_id in unlabeled.ids])


class _Rows:
    """A read-only view of (dataset, row) pairs as one data set (for the image cache)."""

    def __init__(self, sources):
        self.sources = sources
        self.source = sources[0][0].source if sources else Path(".")

    def __len__(self):
        return len(self.sources)

    def load_image(self, i):
        dataset, row = self.sources[i]
        return dataset.load_image(row)


def make_views(student, sources, hyper: TrainHyper, seed: int, out=None):
    """Cache every sample once (pixels or token ids) and wrap it in the view builder."""
    from zmdevice import pipeline

    if student.modality == "image":
        preprocess = student.config["preprocess"]
        pixels = pipeline.cache_images(
            _Rows(sources),
            int(preprocess["image_size"]),
            progress=sys.stderr.isatty(),
            spill_dir=out,
            memory_budget=int(hyper.image_cache_gb * 2**30),
        )
        return pipeline.ImageViews(pixels, tuple(preprocess["mean"]), tuple(preprocess["std"]))
    from zmdevice.augment import TextAugment
    from zmdevice.students import encode_token_ids

    texts = [dataset.texts[row] for dataset, row in sources]
    token_ids = encode_token_ids(student.tokenizer, texts, student.max_length)
    augment = TextAugment(student.mask_token_id, student.special_token_ids)
    return pipeline.TextViews(token_ids, student.pad_token_id, augment, random.Random(seed))


def check_data(data: TrainData, plans: list[StagePlan], hyper: TrainHyper, config) -> None:
    """Data problems caught as one-line user errors before any training."""
    uses_labeled = any(plan.name == "ssl" for plan in plans)
    if uses_labeled:
        counts = data.labeled_y.bincount(minlength=len(data.classes))
        empty = [
            name for name, count in zip(data.classes, counts.tolist(), strict=True) if not count
        ]
        if empty:
            raise UserError(
                f"--labeled {config.labeled} has no example of class(es) "
                f"{', '.join(repr(name) for name in empty)}: add at least one labeled example "
                "per class"
            )
    for plan in plans:
        if plan.name == "kd":
            need, have, what = hyper.kd_batch_size, len(data.kd_train), "stage-1 batch"
        elif plan.unsup is not None or plan.kd_head:
            need, have, what = hyper.unlabeled_batch_size, data.num_pool, "unlabeled batch"
        else:
            continue
        if have < need:
            raise UserError(
                f"--unlabeled {config.unlabeled} has {have} usable samples, fewer than one "
                f"{what} of {need}: add unlabeled data or lower the batch size in --config"
            )


# --------------------------------------------------------------------------- losses per stage


def distill_loss(logits, data: TrainData, pool_idx, hyper: TrainHyper, soft: bool):
    """L_KD: CE vs FM hard labels, or (beyond the paper) KL to FM probabilities."""
    from zmdevice.losses import hard_label_ce, soft_label_kl

    if soft:
        return soft_label_kl(logits, data.fm_probs[pool_idx].to(logits.device), hyper.temperature)
    return hard_label_ce(logits, data.fm_label[pool_idx].to(logits.device))


def kd_stage_losses(student, data: TrainData, batch: dict, hyper, soft: bool, device) -> dict:
    """Stage 1: the main head distils the FM on weak views of pool samples."""
    logits = student(**to_device(batch["inputs"], device))
    kd, diagnostics = distill_loss(logits, data, batch["pool"], hyper, soft)
    return {"loss": kd, "kd": kd.detach(), "kd_agreement": diagnostics["accuracy"]}


def ssl_stage_losses(student, data, batch, plan, hyper, alignment, alpha, soft, device) -> dict:
    """Stage 2 and the single-stage baselines: L_s + lambda_u L_u (+ alpha lambda_p L_KD2).

    One concatenated forward pass over (labeled weak, unlabeled weak, unlabeled strong),
    so BatchNorm sees all views together, as in the reference code.
    """
    import torch

    from zmdevice.losses import adamatch_loss, fixmatch_loss, hard_label_ce, soft_label_kl

    labeled, pool = batch["labeled"], batch.get("pool")
    uses_unlabeled = plan.unsup is not None or plan.kd_head
    features = student.features(**to_device(batch["inputs"], device))
    logits = student.head(features)
    n_l = len(labeled)
    n_u = len(pool) if uses_unlabeled else 0
    logits_l, logits_uw, logits_us = logits[:n_l], logits[n_l : n_l + n_u], logits[n_l + n_u :]

    sup, _ = hard_label_ce(logits_l, data.labeled_y[labeled].to(device))
    named = {"sup": sup.detach()}
    loss = sup
    diagnostics: dict = {}
    if plan.unsup == "fixmatch":
        unsup, diagnostics = fixmatch_loss(logits_uw, logits_us, hyper.threshold)
    elif plan.unsup == "adamatch":
        unsup, diagnostics = adamatch_loss(
            logits_uw, logits_us, logits_l, alignment, hyper.threshold
        )
    elif plan.unsup == "fm-labels":
        unsup, _ = distill_loss(logits_uw, data, pool, hyper, soft)
    if plan.unsup is not None:
        loss = loss + hyper.lambda_u * unsup
        named["unsup"] = unsup.detach()
    if "mask" in diagnostics:
        mask = diagnostics["mask"]
        named["mask_rate"] = diagnostics["mask_rate"]
        if data.gold_pool is not None:
            # Pseudo-label accuracy above threshold (docs/measured.md: the collapse detector).
            gold = data.gold_pool[pool].to(device)
            correct = (diagnostics["pseudo_label"] == gold) & mask
            named["pl_accuracy"] = correct.sum().float() / mask.sum().clamp(min=1)
    if plan.kd_head:
        kd_logits = student.kd_head(features[: n_l + n_u])
        if soft:
            # Probabilities exist for pool samples only: labeled ones outside it sit out.
            in_pool = data.labeled_index[labeled] < data.num_pool
            rows = torch.cat([in_pool.nonzero().flatten(), torch.arange(n_l, n_l + n_u)])
            targets = data.fm_probs[torch.cat([data.labeled_index[labeled][in_pool], pool])]
            kd, _ = soft_label_kl(kd_logits[rows.to(device)], targets.to(device), hyper.temperature)
        else:
            fm_targets = torch.cat([data.labeled_fm[labeled], data.fm_label[pool]])
            kd, _ = hard_label_ce(kd_logits, fm_targets.to(device))
        loss = loss + alpha * hyper.lambda_p * kd
        named["kd"] = kd.detach()
        named["alpha"] = torch.tensor(alpha)
    named["loss"] = loss
    return named


def to_device(inputs: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}


# --------------------------------------------------------------------------- evaluation


def predict(student, data: TrainData, indices, batch_size: int, device):
    """Main-head predictions [N] (int64, CPU) on clean views, in eval mode."""
    import torch

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


def recalibrate(student, data: TrainData, hyper: TrainHyper, device, seed: int) -> int:
    """Re-estimate BatchNorm statistics on clean unlabeled images (no labels)."""
    import torch

    from zmdevice.students import recalibrate_batchnorm

    if data.modality != "image" or hyper.bn_recalibration_batches == 0:
        return 0
    order = torch.randperm(data.num_pool, generator=torch.Generator().manual_seed(seed + 2))
    size = hyper.eval_batch_size
    batches = (
        to_device(data.views.batch([("clean", order[start : start + size])]), device)
        for start in range(0, len(order), size)
    )
    return recalibrate_batchnorm(student, batches, max_batches=hyper.bn_recalibration_batches)


def evaluate_now(model, data: TrainData, plan: StagePlan, hyper, device) -> dict:
    """Held-out agreement with the FM (stage 1) and test accuracy (when --test is given)."""
    results = {}
    if plan.name == "kd":
        predicted = predict(model, data, data.holdout, hyper.eval_batch_size, device)
        results["heldout_agreement"] = float(
            (predicted == data.fm_label[data.holdout]).float().mean()
        )
        if data.gold_pool is not None:
            gold = data.gold_pool[data.holdout]
            results["heldout_gold_accuracy"] = float((predicted == gold).float().mean())
    if data.test_index is not None:
        predicted = predict(model, data, data.test_index, hyper.eval_batch_size, device)
        results["test_accuracy"] = float((predicted == data.test_y).float().mean())
    return results


def final_test_report(model, data: TrainData, hyper: TrainHyper, device) -> dict:
    """Accuracy, macro-F1 and per-class numbers of the saved model on --test (if given)."""
    from zmdevice.metrics import classification_report

    if data.test_index is None:
        return {}
    predicted = predict(model, data, data.test_index, hyper.eval_batch_size, device)
    report = classification_report(data.test_y.numpy(), predicted.numpy(), data.classes)
    return {
        "test_accuracy": float(report["accuracy"]),
        "test_macro_f1": float(report["macro_f1"]),
        "test_report": report,
    }


# --------------------------------------------------------------------------- optimisation


def make_optimizer(student, hyper: TrainHyper, steps: int, freeze_embeddings: bool):
    """Fresh AdamW and a linear-warmup + cosine schedule (reset for every stage)."""
    import torch

    groups = student.parameter_groups(
        hyper.lr, hyper.head_lr, hyper.weight_decay, freeze_word_embeddings=freeze_embeddings
    )
    for group in groups:
        group.pop("name", None)
    # The fused kernel makes the AdamW step ~4x cheaper on CPU than the foreach one.
    device_type = next(student.parameters()).device.type
    fast = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, **fast)
    warmup = int(hyper.warmup * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WeightEMA:
    """Exponential moving average of a student's weights (optional, off by default)."""

    def __init__(self, student, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(student).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    def update(self, student) -> None:
        import torch

        with torch.no_grad():
            for ema, live in zip(self.model.parameters(), student.parameters(), strict=True):
                ema.lerp_(live, 1.0 - self.decay)
            for ema, live in zip(self.model.buffers(), student.buffers(), strict=True):
                ema.copy_(live)


# --------------------------------------------------------------------------- the loop


@dataclass
class RunState:
    """What a run carries from step to step; what ``checkpoint`` saves."""

    config: TrainConfig
    hyper: TrainHyper
    plans: list[StagePlan]
    data: TrainData
    student: Any
    device: Any
    out: Path
    soft: bool
    freeze_embeddings: bool
    stage_index: int = 0
    step: int = 0
    global_step: int = 0
    optimizer: Any = None
    scheduler: Any = None
    alignment: Any = None
    ema: WeightEMA | None = None
    samplers: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    """Stage 1 model selection: {"agreement", "step", "state"}."""
    ahead: list = field(default_factory=list)
    """Batches drawn, with their model inputs built, for the next steps (see draw_batch)."""
    stage_summaries: list = field(default_factory=list)
    log: Any = None
    on_step: Any = None


def begin_stage(run: RunState, plan: StagePlan) -> None:
    """Fresh optimizer, schedule, alignment state and samplers; KD head for stage 2."""
    from zmdevice.losses import DistributionAlignment
    from zmdevice.pipeline import Sampler

    seed = run.config.seed * 1000 + run.stage_index
    if plan.kd_head and run.student.kd_head is None:
        run.student.attach_kd_head(seed=seed)
        run.student.to(run.device)
    run.optimizer, run.scheduler = make_optimizer(
        run.student, run.hyper, plan.steps, run.freeze_embeddings
    )
    run.alignment = DistributionAlignment(len(run.data.classes), run.hyper.da_momentum)
    run.ema = WeightEMA(run.student, run.hyper.ema_decay) if run.hyper.ema_decay else None
    hyper, data = run.hyper, run.data
    if plan.name == "kd":
        run.samplers = {"pool": Sampler(len(data.kd_train), hyper.kd_batch_size, seed)}
    else:
        run.samplers = {
            "labeled": Sampler(len(data.labeled_y), hyper.labeled_batch_size, seed),
            "pool": Sampler(data.num_pool, hyper.unlabeled_batch_size, seed + 1),
        }
    run.best = {}
    run.ahead = []


LOOKAHEAD_STEPS = 4
"""Steps whose image views are built together (see ``draw_batch``)."""
LOOKAHEAD_BYTES = 32 * 2**20
"""...as long as their float32 inputs fit in this much memory."""


def draw_batch(run: RunState, plan: StagePlan) -> dict:
    """The next batch: ``pool`` (into the index space), ``labeled`` (rows) and ``inputs``.

    Image views are built for several steps in one call: at 32 px the per-call cost of
    batched RandAugment and pad-crop-flip outweighs the per-image cost, and on a 2-core
    CPU it is a visible part of a step. The batches drawn but not yet trained on are kept
    in ``run.ahead`` and saved in checkpoints, so a resumed run trains on the same ones.
    Text batches are built one step at a time (padding is per batch).
    """
    if not run.ahead:
        remaining = plan.steps - run.step
        run.ahead = draw_batches(run, plan, max(1, min(steps_ahead(run, plan), remaining)))
    return run.ahead.pop(0)


def steps_ahead(run: RunState, plan: StagePlan) -> int:
    if run.data.modality != "image":
        return 1
    size = run.data.views.pixels.shape[-1]
    rows = run.hyper.kd_batch_size
    if plan.name != "kd":
        rows = run.hyper.labeled_batch_size + 2 * run.hyper.unlabeled_batch_size
    return max(1, min(LOOKAHEAD_STEPS, LOOKAHEAD_BYTES // (rows * 3 * size * size * 4)))


def draw_batches(run: RunState, plan: StagePlan, count: int) -> list[dict]:
    """``count`` consecutive batches; their views come from one ``views.batch`` call."""
    import torch

    data = run.data
    batches, groups = [], []
    for _ in range(count):
        if plan.name == "kd":
            batch = {"pool": data.kd_train[run.samplers["pool"].next()]}
        else:
            batch = {"labeled": run.samplers["labeled"].next()}
            if plan.unsup is not None or plan.kd_head:
                batch["pool"] = run.samplers["pool"].next()
        batches.append(batch)
        groups.append(view_groups(data, plan, batch))
    if count == 1:
        batches[0]["inputs"] = data.views.batch(groups[0])
        return batches
    rows = [sum(len(indices) for _, indices in step) for step in groups]
    inputs = data.views.batch([group for step in groups for group in step])
    for batch, pixel_values in zip(batches, torch.split(inputs["pixel_values"], rows), strict=True):
        batch["inputs"] = {"pixel_values": pixel_values}
    return batches


def view_groups(data: TrainData, plan: StagePlan, batch: dict) -> list[tuple[str, Any]]:
    """The (view, indices) groups of one step's forward pass, in the order the losses slice.

    Stage 1: weak views of pool samples. Stage 2 and the single-stage methods: labeled
    weak, then unlabeled weak (SSL or KD head), then unlabeled strong (SSL).
    """
    if plan.name == "kd":
        return [("weak", batch["pool"])]
    groups = [("weak", data.labeled_index[batch["labeled"]])]
    if plan.unsup is not None or plan.kd_head:
        groups.append(("weak", batch["pool"]))
    if plan.unsup in ("adamatch", "fixmatch"):
        groups.append(("strong", batch["pool"]))
    return groups


def stage_losses(run: RunState, plan: StagePlan, batch: dict) -> dict:
    """Forward pass and the named losses of one step of ``plan``."""
    from zmdevice.losses import alpha_ramp

    if plan.name == "kd":
        return kd_stage_losses(run.student, run.data, batch, run.hyper, run.soft, run.device)
    alpha = alpha_ramp(run.step, plan.steps) if run.hyper.alpha == "ramp" else 1.0
    return ssl_stage_losses(
        run.student, run.data, batch, plan, run.hyper, run.alignment, alpha, run.soft, run.device
    )


def run_stage(run: RunState, plan: StagePlan) -> None:
    """Train one stage from ``run.step`` to ``plan.steps`` (or stage 1's early stop).

    batch -> forward -> loss -> backward -> step -> log, then periodic evaluation
    (stage 1: keep the weights that agree most with the FM on the held-out slice) and
    checkpoints.
    """
    import torch
    from tqdm import tqdm

    hyper = run.hyper
    label = f"stage {run.stage_index + 1}/{len(run.plans)} {plan.name}"
    progress = tqdm(
        total=plan.steps,
        initial=run.step,
        desc=label,
        leave=True,
        disable=None,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    run.student.train()
    while run.step < plan.steps:
        batch = draw_batch(run, plan)
        named = stage_losses(run, plan, batch)
        run.optimizer.zero_grad(set_to_none=True)
        named["loss"].backward()
        if hyper.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.student.parameters(), hyper.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.student)
        run.step += 1
        run.global_step += 1

        values = {key: float(value.detach()) for key, value in named.items()}
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "alpha"})
        last = run.step == plan.steps
        if run.step % hyper.log_every == 0 or last:
            lr = run.optimizer.param_groups[0]["lr"]
            run.log.write(run, plan, {**values, "lr": lr})
        if (hyper.eval_every and run.step % hyper.eval_every == 0) or last:
            stop = evaluate_and_select(run, plan)
            if stop:
                run.log.write(run, plan, {"early_stop": True})
                break
        if hyper.checkpoint_every and run.step % hyper.checkpoint_every == 0 and not last:
            save_checkpoint(run)
        if run.on_step is not None:
            run.on_step(run, values)
        if hyper.stop_after is not None and run.global_step >= hyper.stop_after and not last:
            save_checkpoint(run)
            progress.close()
            raise StopTraining(run.global_step)
    progress.close()
    run.stage_summaries.append(
        {"stage": plan.name, "steps": run.step, "seconds": round(time.perf_counter() - started, 1)}
    )


class StopTraining(Exception):
    """Raised after ``stop_after`` steps once the checkpoint is written."""


def evaluate_and_select(run: RunState, plan: StagePlan) -> bool:
    """Evaluate, log, keep the best stage-1 weights; True when stage 1 may stop early."""
    model = run.ema.model if run.ema is not None else run.student
    results = evaluate_now(model, run.data, plan, run.hyper, run.device)
    if results:
        run.log.write(run, plan, results)
    if plan.name != "kd":
        return False
    agreement = results["heldout_agreement"]
    if not run.best or agreement > run.best["agreement"]:
        run.best = {"agreement": agreement, "step": run.step, "state": cpu_state(model)}
    return agreement > run.hyper.early_stop_agreement and run.step < plan.steps


def cpu_state(model) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------- logging and files


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = path
        lines = []
        if keep_until is not None and path.is_file():
            # On resume, drop what was logged after the checkpoint: those steps rerun.
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line)["global_step"] <= keep_until:
                    lines.append(line + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
        self.handle = path.open("a", encoding="utf-8")

    def write(self, run: RunState, plan: StagePlan, values: dict) -> None:
        record = {
            "stage": plan.name,
            "stage_index": run.stage_index,
            "step": run.step,
            "global_step": run.global_step,
            **{
                key: round(value, 6) if isinstance(value, float) else value
                for key, value in values.items()
            },
        }
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def save_checkpoint(run: RunState) -> None:
    """Everything needed to continue exactly: weights, optimizer, schedule, RNGs, position."""
    import numpy as np
    import torch

    state = {
        "version": 1,
        "fingerprint": run.data.fingerprint,
        "method": run.config.method,
        "student": run.config.student,
        "stage_index": run.stage_index,
        "step": run.step,
        "global_step": run.global_step,
        "kd_head": run.student.kd_head is not None,
        "model": cpu_state(run.student),
        "optimizer": run.optimizer.state_dict() if run.optimizer else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "alignment": run.alignment.state_dict() if run.alignment else None,
        "ema": cpu_state(run.ema.model) if run.ema else None,
        "samplers": {name: sampler.state_dict() for name, sampler in run.samplers.items()},
        "ahead": run.ahead,
        "best": run.best,
        "stage_summaries": run.stage_summaries,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "text": run.data.views.rng.getstate() if run.data.modality == "text" else None,
        },
    }
    with atomic_path(run.out / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def restore_checkpoint(run: RunState, state: dict) -> None:
    """Undo ``save_checkpoint``: rebuild the stage in progress, then load every state."""
    import numpy as np
    import torch

    if state["fingerprint"] != run.data.fingerprint or state["method"] != run.config.method:
        raise UserError(
            f"{run.out / CHECKPOINT_FILE} belongs to another run (other data or method); "
            "use another --out or drop --resume"
        )
    run.stage_index, run.step = state["stage_index"], state["step"]
    run.global_step = state["global_step"]
    run.stage_summaries = state["stage_summaries"]
    plan = run.plans[run.stage_index]
    if state["kd_head"]:
        run.student.attach_kd_head(seed=0)
    run.student.load_state_dict(state["model"])
    run.student.to(run.device)
    begin_stage(run, plan)
    if state["optimizer"] is not None:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
    if state["alignment"] is not None:
        run.alignment.load_state_dict(state["alignment"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.model.load_state_dict(state["ema"])
    for name, sampler_state in state["samplers"].items():
        run.samplers[name].load_state_dict(sampler_state)
    run.ahead = state.get("ahead", [])
    run.best = state["best"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["text"] is not None:
        run.data.views.rng.setstate(rng["text"])


def write_train_config(config: TrainConfig, hyper: TrainHyper, path: Path) -> None:
    """``train_config.toml``: every setting of this run, loadable with ``--config``."""
    import tomli_w

    values = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in ("extra", "resume") or value is None:
            continue
        values[item.name] = str(value) if isinstance(value, Path) else value
    extra = {k: v for k, v in dataclasses.asdict(hyper).items() if v is not None}
    extra.pop("stop_after", None)
    for key in ("classes", "gold_unlabeled"):
        if key in config.extra:
            extra[key] = str(config.extra[key]) if key == "gold_unlabeled" else config.extra[key]
    values["extra"] = extra
    write_text_atomic(path, tomli_w.dumps(values))


# --------------------------------------------------------------------------- entry point


def run_train(config: TrainConfig, on_step=None) -> dict:
    """Train a student as ``config`` says and write ``models/NAME/``.

    Args:
        config: the typed settings (CLI flags and ``--config`` file).
        on_step: optional plain callback ``on_step(run, values)`` after every step
            (tests use it to interrupt a run).

    Returns:
        Summary dict; ``lines`` is the one-screen text the CLI prints.
    """
    import numpy as np
    import torch

    from zmdevice.catalog import require_entry
    from zmdevice.device import resolve_device
    from zmdevice.students import build_student, save_student

    started = time.perf_counter()
    preset = config.student.partition(":")[0]
    modality = require_entry(preset, "student", "--student").get("modality", "image")
    hyper = hyper_for(modality, config.extra)
    device = resolve_device(config.device)
    if device.type == "cpu":
        # The cores this process may use (taskset, containers), not all of the machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(hyper.threads or cores or 1)
    kd_default, ssl_default = DEFAULT_STEPS[modality]
    kd_steps = config.kd_steps if config.kd_steps is not None else kd_default
    if config.method in ("zeromatch", "kd"):
        ssl_steps = config.ssl_steps if config.ssl_steps is not None else ssl_default
    else:
        ssl_steps = config.ssl_steps if config.ssl_steps is not None else kd_default + ssl_default
    plans = [plan for plan in plan_stages(config.method, kd_steps, ssl_steps, hyper.ssl_loss)]
    needs_fm = config.method in FM_METHODS
    soft = bool(config.soft_labels) and needs_fm
    out = Path(config.out) if config.out else Path("models") / f"{preset}-{config.method}"

    classes, labeled, unlabeled, pseudo, test = load_data(config, hyper, needs_fm)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    overrides = {}
    if hyper.image_size and modality == "image":
        overrides["image_size"] = hyper.image_size
    if hyper.max_length and modality == "text":
        overrides["max_length"] = hyper.max_length
    student = build_student(config.student, classes, seed=config.seed, preprocess=overrides)
    data = build_data(
        config, hyper, student, classes, labeled, unlabeled, pseudo, test, config.seed, out
    )
    check_data(data, plans, hyper, config)
    # Channels-last makes MobileNetV3's depthwise convolutions ~2.5x faster to train on CPU
    # (a no-op for text); saved weights keep the standard layout.
    student.to(device).use_channels_last()
    freeze = hyper.freeze_word_embeddings
    run = RunState(
        config=config,
        hyper=hyper,
        plans=plans,
        data=data,
        student=student,
        device=device,
        out=out,
        soft=soft,
        freeze_embeddings=device.type == "cpu" if freeze is None else freeze,
        on_step=on_step,
    )

    checkpoint_path = out / CHECKPOINT_FILE
    resumed_at = None
    if config.resume:
        if not checkpoint_path.is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint_path}; run without --resume")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        restore_checkpoint(run, state)
        resumed_at = run.global_step
    else:
        begin_stage(run, plans[0])
    run.log = MetricsLog(out / "metrics.jsonl", keep_until=resumed_at if resumed_at else -1)
    write_train_config(config, hyper, out / "train_config.toml")
    try:
        while run.stage_index < len(plans):
            plan = plans[run.stage_index]
            run_stage(run, plan)
            if plan.name == "kd" and run.best:
                # Model selection: continue (or finish) from the best held-out weights.
                run.student.load_state_dict(run.best["state"])
            run.stage_index += 1
            run.step = 0
            if run.stage_index < len(plans):
                begin_stage(run, plans[run.stage_index])
                save_checkpoint(run)
    except StopTraining:
        line = (
            f"stopped after {run.global_step} steps as asked (stop_after); continue with --resume"
        )
        return {"out": str(out), "stopped_at": run.global_step, "lines": [line]}
    finally:
        run.log.close()

    model = run.ema.model if run.ema is not None else run.student
    recalibrated = recalibrate(model, data, hyper, device, config.seed)
    final = final_test_report(model, data, hyper, device)
    save_student(model, out)
    summary = build_summary(run, out, final, recalibrated, time.perf_counter() - started)
    from zmdevice.report import write_report

    write_report(out, summary)
    return summary


def build_summary(run: RunState, out: Path, final: dict, recalibrated: int, seconds: float):
    """The dict ``run_train`` returns, with the CLI's ``lines``."""
    config = run.config
    summary = {
        "out": str(out),
        "method": config.method,
        "student": config.student,
        "device": str(run.device),
        "classes": run.data.classes,
        "labeled": len(run.data.labeled_y),
        "unlabeled": run.data.num_pool,
        "stages": run.stage_summaries,
        "seconds": round(seconds, 1),
        "bn_recalibrated_on": recalibrated,
    }
    if run.best:
        summary["heldout_agreement"] = run.best["agreement"]
        summary["best_kd_step"] = run.best["step"]
    summary.update(final)
    lines = [
        f"trained {config.student} with {config.method} on {summary['device']} in "
        f"{summary['seconds']:.0f} s ({len(run.data.labeled_y)} labeled, "
        f"{run.data.num_pool} unlabeled, {len(run.data.classes)} classes)"
    ]
    for stage in run.stage_summaries:
        lines.append(f"  {stage['stage']}: {stage['steps']} steps, {stage['seconds']:.1f} s")
    if run.best:
        lines.append(
            f"  stage-1 held-out agreement with the FM: {100 * run.best['agreement']:.1f}% "
            f"(step {run.best['step']})"
        )
    if "test_accuracy" in final:
        lines.append(
            f"  test accuracy {100 * final['test_accuracy']:.1f}%, "
            f"macro-F1 {100 * final['test_macro_f1']:.1f}%"
        )
    lines.append(f"  saved to {out} (metrics.jsonl, report.md, curves.png)")
    summary["lines"] = lines
    return summary
