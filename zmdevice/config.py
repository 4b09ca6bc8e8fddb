"""Typed configs, one dataclass per command; every default is written here and nowhere else.

The CLI maps the flags the user typed and an optional ``--config`` TOML file onto these
(``load_config``): a typed flag always wins over the file, a flag left out never does.
File values are type-checked when the file is read; ``__post_init__`` checks every field's
type (``check_fields``: no strings for numbers, no bools for integers, no fractional
integers, finite floats, 64-bit integers; paths may be strings or ``os.PathLike``) before
any range, so a config built from Python (``zmdevice.api``) is held to the same rules as
the command line. A bad value is a ``UserError`` naming the key, where it came from and
what is expected.

The field docstrings are also the CLI's help text (``zmdevice.cli_options``). The generic
checks live in ``config_checks``, the ``--config`` loader in ``config_files`` and what follows
the data's modality (``MODALITY_DEFAULTS``, ``DEFAULT_STUDENTS``, ``resolve_student``) in
``modality``; their names are re-exported here. What stays is the dataclasses, each beside
its own range checks.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from zmdevice.config_checks import FIELD_TYPES as FIELD_TYPES
from zmdevice.config_checks import (
    ConfigError,
    at_least,
    check_choice,
    check_device,
    check_fields,
    require,
    shown,
)
from zmdevice.config_checks import checked_value as checked_value
from zmdevice.config_files import config_fields as config_fields
from zmdevice.config_files import load_config as load_config
from zmdevice.config_files import read_config_file as read_config_file
from zmdevice.errors import UserError
from zmdevice.modality import DEFAULT_STUDENTS as DEFAULT_STUDENTS
from zmdevice.modality import DEFAULT_TEACHERS as DEFAULT_TEACHERS
from zmdevice.modality import MODALITY_DEFAULTS
from zmdevice.modality import resolve_student as resolve_student
from zmdevice.precision import PRECISIONS, RUNTIMES

RUNS = Path("runs")
"""The working folder every default output goes under, never a source folder: ``labels/``,
``models/`` and ``export/`` inside it (the layout of ``zmdevice demo``'s folder)."""

GUARD_ACTIONS = ("rollback", "distill", "stop", "off")
LOG_TRACKERS = ("none", "tensorboard", "mlflow")
"""``--log`` values: none and ``trackers.TRACKERS`` (a test keeps the two equal)."""


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A training method as validation and help see it; its stages' behaviour (views,
    losses, samplers) lives with the stage objects of ``training.stages.METHOD_STAGES``,
    whose names this table matches (tests/test_train.py)."""

    summary: str
    """One line for the CLI help."""
    stages: tuple[str, ...]
    """Its stages' names in order, as metrics.jsonl writes them: 'kd' (distil the FM) or
    'ssl' (a labeled batch, with or without L_u and the KD head)."""
    uses_fm: bool
    """Needs --pseudo-labels."""


METHODS = {
    "zeromatch": Method(
        "stage 1 distils the FM, stage 2 L_s + L_u + alpha_t * lambda_p * L_KD2 (the paper)",
        ("kd", "ssl"),
        uses_fm=True,
    ),
    "kd": Method("stage 1 only: the student distils the FM's labels", ("kd",), uses_fm=True),
    "supervised": Method("L_s on the labeled set only", ("ssl",), uses_fm=False),
    "fixmatch": Method("L_s + FixMatch L_u (no FM)", ("ssl",), uses_fm=False),
    "adamatch": Method("L_s + AdaMatch L_u (no FM)", ("ssl",), uses_fm=False),
    "naive-pl": Method(
        "L_s + CE vs the FM's labels on unlabeled data, taken as true labels",
        ("ssl",),
        uses_fm=True,
    ),
}
"""Every --method. A new method is one entry here and its stages in
``training.stages.METHOD_STAGES``."""


def methods_help() -> str:
    return "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())


# --------------------------------------------------------------------------- label


@dataclass
class DataOptions:
    """How to read a data set (column names for tables, corrupt-image policy)."""

    text_column: str = "text"
    """Column holding the text of a text table."""
    id_column: str = "id"
    """Column holding sample ids (optional; derived from content when absent)."""
    label_column: str = "label"
    """Column holding class names in labeled tables."""
    path_column: str = "path"
    """Column holding image paths (relative to the table) in image tables."""
    skip_corrupt: bool = False
    """Skip and count unreadable images instead of failing on the first one."""

    def __post_init__(self):
        check_fields(self)


ENGINES = ("local", "ray")


@dataclass
class LabelConfig:
    """`zmdevice label`: run a foundation model zero-shot once, write pseudo-labels."""

    data: Path
    """Data to label (text table, image folder or image table)."""
    classes: str
    """Class list: comma list, one-per-line file, or TOML/JSON with prompts."""
    teacher: str
    """Catalog name or kind:spec of the foundation model."""
    out: Path | None = None
    """Output Parquet file; default runs/labels/<data name>-<teacher>.parquet."""
    batch_size: int = 64
    """Teacher batch size."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    top_k: int | None = None
    """Most probabilities kept per sample; None = all classes up to 1024 (rows keep fewer
    when the rest costs < 6e-4 nats of KL)."""
    gold: Path | None = None
    """Labeled data whose true labels give the FM quality report."""
    resume: bool = False
    """Continue an interrupted run of the same output file."""
    shard: str | None = None
    """'I/N': label only the I-th of N deterministic slices (0-based I)."""
    templates: str | None = None
    """CLIP prompt templates: 'paper' (default), 'openai', or a file of templates."""
    workers: int | None = None
    """Data-loading workers; None: none for text, up to 4 (cores - 1) for images."""
    data_options: DataOptions = field(default_factory=DataOptions)
    """Column names and corrupt-image policy."""
    combine: bool = False
    """Instead of labeling, join the shard files of ``out`` (``NAME.shard-I-of-N.parquet``)."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16: the teacher's compute dtype (``zmdevice.precision``)."""
    runtime: str = "auto"
    """Teacher runtime: auto, torch, onnx or onnx-int8 (``zmdevice.precision.choose_runtime``)."""
    few_shot: Path | None = None
    """Your labeled examples: the labels written are then the best of zero-shot, few-shot
    (a probe on the FM's features times its zero-shot probabilities) and refined (spread
    over the data's neighbour graph, with or without the FM's prior), by cross-validation on
    these examples (``zmdevice.label_source``); None: the paper's zero-shot labels."""
    refine: bool | None = None
    """True: refined labels (spread over the neighbour graph of the data's FM features,
    ``zmdevice.refine``); False: never refined; None: as cross-validation decides when
    ``few_shot`` is given, else not refined."""
    class_prior: str | None = None
    """The class shares the refined labels are rebalanced to: 'balanced', 'cat=3,dog=1' or a
    .json/.toml file (``zmdevice.classes.load_class_prior``); None keeps the FM's."""
    engine: str = "local"
    """local: this process and its loader workers; ray: a Ray Data actor pool."""
    ray_address: str | None = None
    """Ray cluster to join (as printed by ``ray start --head``); None starts a local one."""
    ray_workers: int = 1
    """Ray teacher actors; each loads the teacher once and labels batch after batch."""
    gpus_per_worker: float = 0.0
    """GPUs per Ray teacher actor (fractions share a GPU); 0 runs the teacher on CPUs."""

    def __post_init__(self):
        check_fields(self)
        check_device(self.device)
        at_least(self, 1, "batch_size", "top_k", "ray_workers")
        at_least(self, 0, "workers", "gpus_per_worker")
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "runtime", RUNTIMES)
        if self.engine not in ENGINES:
            choices = ", ".join(ENGINES)
            raise ConfigError("engine", f"--engine '{self.engine}': use one of {choices}")
        if self.engine == "ray" and self.few_shot is not None:
            raise ConfigError(
                "few_shot",
                "--few-shot works with --engine local only (Ray workers load the "
                "plain teacher); label with the local engine",
            )
        if self.refine and (self.engine == "ray" or self.shard is not None):
            flag = "--engine ray" if self.engine == "ray" else "--shard"
            raise ConfigError(
                "refine",
                f"--refine needs every sample's features in one run, not {flag}: label "
                "with the local engine and without --shard",
            )
        refinable = self.refine or (self.refine is None and self.few_shot is not None)
        if self.class_prior is not None and not (refinable and self.shard is None):
            raise ConfigError(
                "class_prior",
                "--class-prior rebalances the refined labels, which see every sample at "
                "once: add --refine (or --few-shot), without --shard",
            )
        if self.engine == "ray" and self.device not in ("auto", "cpu"):
            raise ConfigError(
                "device",
                f"--device {self.device} with --engine ray: the Ray workers' device follows "
                "--gpus-per-worker (0: CPU, more: a GPU each); leave --device at auto",
            )


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """`zmdevice train`: ZeroMatch (stage 1 KD, stage 2 SSL + auxiliary KD) and baselines.

    Fields whose default is None and that ``MODALITY_DEFAULTS`` lists take the student's
    default: its catalog entry's ``[train]`` table, else its modality's (``for_modality``);
    the other defaults are the CPU image settings.
    """

    labeled: Path
    """Labeled data (the few true labels)."""
    unlabeled: Path
    """Unlabeled training data (the labeled samples are part of it too)."""
    pseudo_labels: Path | None = None
    """Pseudo-label file from `zmdevice label`; None with a method that uses the FM: made
    first, as `zmdevice label UNLABELED --few-shot LABELED` makes them, with ``teacher``."""
    teacher: str | None = None
    """The FM that labels the unlabeled data when no ``pseudo_labels`` are given; None: the
    default of the data's modality, ``DEFAULT_TEACHERS``."""
    student: str | None = None
    """Student preset from the catalog (``preset:weights`` for other weights); None: the
    default of the labeled data's modality, ``DEFAULT_STUDENTS`` (``resolve_student``)."""
    out: Path | None = None
    """Output folder; default runs/models/<student>-<method>."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    method: str = "zeromatch"
    """One of ``METHODS``."""
    kd_steps: int | None = None
    """Stage-1 steps; None = the modality's default."""
    ssl_steps: int | None = None
    """Stage-2 steps; None = the modality's default (single-stage methods: both stages')."""
    seed: int = 0
    """Seed for weights, sampling and augmentation."""
    resume: bool = False
    """Continue exactly from the last checkpoint in ``out``."""
    overwrite: bool = False
    """Delete the files of a previous run in ``out`` before training."""
    test: Path | None = None
    """Optional labeled test data evaluated periodically."""
    soft_labels: bool = False
    """Beyond the paper: KL to the FM's probabilities instead of CE on hard labels."""
    allow_partial: bool = False
    """Train on the intersection when the pseudo-label file misses some ids."""
    classes: list[str] | None = None
    """Explicit class list (checked against the pseudo-label file); None = from the data."""
    gold_unlabeled: Path | None = None
    """True labels of the pool, only for the pseudo-label accuracy diagnostic."""
    image_size: int | None = None
    """Image side S in pixels; None = the student preset's (64 for efficientnet_lite0, 32
    for mobilenet_v3_small)."""
    max_length: int | None = None
    """Longest token sequence; None = the student preset's (40 for distilbert)."""
    kd_batch_size: int | None = None
    """Stage-1 batch (all samples, weak view); None = the modality's default."""
    labeled_batch_size: int = 16
    """Stage-2 labeled batch."""
    unlabeled_batch_size: int | None = None
    """Stage-2 unlabeled batch (weak + strong view each); None = the modality's default."""
    lr: float | None = None
    """Peak learning rate of the backbone (AdamW); None = the modality's default."""
    head_lr: float | None = None
    """Peak learning rate of the heads; None = the modality's default."""
    weight_decay: float | None = None
    """AdamW weight decay (matrices and kernels only); None = the modality's default."""
    warmup: float | None = None
    """Share of each stage's steps warming up linearly, then cosine to 0; None = default."""
    ssl_lr_scale: float = 1.0
    """Stage 2's peak learning rates (lr and head_lr) as a multiple of stage 1's, when stage 2
    follows a stage 1 (zeromatch). 1 = the paper's fresh schedule at the same rates."""
    ssl_weight_average: float = 1.0
    """Stage 2 (after stage 1) ends on an exponential moving average of its weights, started
    at stage 1's, with a horizon of this share of stage 2's steps (``training.average``;
    1 chosen on dev across the benchmark's domains); 0 = off: the last weights, as the
    paper."""
    ssl_loss: str = "adamatch"
    """L_u of zeromatch: adamatch (as the paper) or fixmatch."""
    threshold: float = 0.95
    """FixMatch confidence threshold / AdaMatch relative threshold."""
    da_momentum: float = 0.99
    """EMA momentum of AdaMatch's class distributions (paper: 0.999; why: ``zmdevice.modality``)."""
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
    grad_clip: float | None = None
    """Max gradient norm (0 = no clipping); None = the modality's default."""
    freeze_word_embeddings: bool | None = None
    """Text: keep the word-embedding matrix fixed; None = on CPU only."""
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
    time_budget: float | None = None
    """Minutes for the whole run: the stages' steps are planned from measured step times,
    split as kd_steps:ssl_steps, and training stops on time (``training.budget``)."""
    collapse_guard: str = "rollback"
    """Stage-2 collapse guard (``training.guard``): rollback (to the last weights the rule
    passed, then finish), distill (roll back, then spend stage 2's remaining steps on stage-1
    distillation), stop (finish with the weights as they are) or off."""
    collapse_agreement: bool = True
    """Also a collapse: held-out agreement with the pseudo-labels below ``2a - 1``, the
    least a student as accurate as labels right on a share ``a`` keeps (``a`` measured on
    the labeled examples; no floor when unknown or a <= 0.5)."""
    collapse_class_fraction: float = 0.5
    """Also a collapse: a class keeping less than this share of its held-out predictions at
    stage 2's start while the predictions grow less even (0: not judged)."""
    collapse_entropy_fraction: float = 0.5
    """Collapse when the predicted-class entropy on the held-out slice falls below this
    share of its stage-2 highest."""
    collapse_patience: int = 3
    """Consecutive stage-2 evaluations that must break the rule before the guard acts (the
    last evaluation of the stage acts at once)."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16: the student's compute dtype in training steps (weights,
    optimizer and losses stay fp32; ``zmdevice.precision``). The run records the resolved one."""
    log: str = "none"
    """Tracker that also gets the metrics, settings and report: none, tensorboard or mlflow."""

    def __post_init__(self):
        check_fields(self)
        check_device(self.device)
        at_least(self, 0, "seed")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "--resume and --overwrite exclude each other")
        require(self, "method", self.method in METHODS, f"one of {', '.join(METHODS)}")
        require(self, "ssl_loss", self.ssl_loss in ("adamatch", "fixmatch"), "adamatch/fixmatch")
        require(self, "alpha", self.alpha in ("ramp", "constant"), "ramp or constant")
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "log", LOG_TRACKERS)
        at_least(self, 0, "kd_steps", "ssl_steps", "eval_every", "checkpoint_every")
        at_least(self, 0, "weight_decay", "lambda_u", "lambda_p", "grad_clip", "image_cache_gb")
        at_least(self, 0, "bn_recalibration_batches", "ssl_weight_average")
        at_least(self, 1, "kd_batch_size", "labeled_batch_size", "unlabeled_batch_size")
        at_least(self, 1, "eval_batch_size", "holdout_max", "log_every", "threads", "stop_after")
        at_least(self, 1, "image_size", "max_length", "collapse_patience")
        for key in ("lr", "head_lr", "temperature", "ssl_lr_scale"):
            value = getattr(self, key)
            require(self, key, value is None or value > 0, "> 0")
        shares = ("warmup", "da_momentum", "collapse_class_fraction", "collapse_entropy_fraction")
        for key in shares:
            value = getattr(self, key)
            require(self, key, value is None or 0 <= value < 1, "in [0, 1)")
        require(self, "threshold", 0 <= self.threshold <= 1, "in [0, 1]")
        require(self, "holdout_fraction", 0 < self.holdout_fraction < 1, "in (0, 1)")
        require(self, "time_budget", self.time_budget is None or self.time_budget > 0, "> 0")
        require(
            self, "collapse_guard", self.collapse_guard in GUARD_ACTIONS, "/".join(GUARD_ACTIONS)
        )

    def for_modality(
        self, modality: str, preset: dict | None = None, preset_name: str = "student preset"
    ) -> TrainConfig:
        """A copy with every None field of ``MODALITY_DEFAULTS`` set to the modality's value,
        or to the student preset's where its ``[train]`` table (``preset``) gives one.

        A method without stage 1 spends both stages' default budget in its one stage.
        """
        table = dict(MODALITY_DEFAULTS[modality])
        unknown = sorted(set(preset or {}) - set(table))
        if unknown:
            raise UserError(
                f"{preset_name}: its [train] table sets {', '.join(unknown)}: it may "
                f"set only {', '.join(table)}"
            )
        table.update(preset or {})
        if "kd" not in METHODS[self.method].stages:
            table["ssl_steps"] += table["kd_steps"]
        return dataclasses.replace(
            self, **{key: value for key, value in table.items() if getattr(self, key) is None}
        )


# --------------------------------------------------------------------------- export

SUPPORTED_OPSETS = range(18, 24)
"""Opsets an export is written in: torch's dynamo exporter implements 18 and up (it
silently writes 18 for a lower request), and 23 is the newest it and onnxruntime know."""


def check_opset(opset: int) -> None:
    """UserError unless ``opset`` is one the exporter really writes (``SUPPORTED_OPSETS``)."""
    if opset not in SUPPORTED_OPSETS:
        raise UserError(
            f"--opset {opset} is not supported: choose {SUPPORTED_OPSETS.start}.."
            f"{SUPPORTED_OPSETS.stop - 1} (default {ExportConfig.opset})"
        )


@dataclass
class ExportConfig:
    """`zmdevice export`: a trained student to one ONNX file (+ optional int8 variant)."""

    model_dir: Path
    """Trained student folder (runs/models/NAME)."""
    out: Path | None = None
    """Output .onnx; default runs/export/<NAME>.onnx."""
    quantize: str | None = None
    """None or 'int8'."""
    test: Path | None = None
    """Labeled test data to compare int8 against fp32."""
    calibration: Path | None = None
    """Calibration images for static int8 (default: the student's training data)."""
    opset: int = 18
    """ONNX opset version."""
    format: str = "onnx"
    """'onnx', or 'ort' to also write ONNX Runtime's mobile format (NAME.ort)."""
    card_license: str | None = None
    """The model card's license, a Hugging Face license id (apache-2.0, mit, other, ...);
    None: the student preset's, for its own weights, else none is claimed."""
    card_language: list[str] | None = None
    """The model card's language codes (en, fr, ...); None: the student preset's or the
    teacher's."""
    card_dataset: list[str] | None = None
    """Data sets named in the model card (Hugging Face dataset ids); None: none."""
    card_intended_use: str | None = None
    """The model card's intended use, in your words; None: a generic sentence."""
    hub_folder: Path | None = None
    """Also write a folder ready for ``huggingface_hub.upload_folder``: README.md (the card),
    the ONNX file(s), the tokenizer and a config.json with the class names."""

    def __post_init__(self):
        check_fields(self)
        if self.quantize not in (None, "int8"):
            raise ConfigError(
                "quantize", f"unknown --quantize '{self.quantize}': the only choice is int8"
            )
        if self.format not in ("onnx", "ort"):
            raise ConfigError("format", f"unknown --format '{self.format}': choose onnx or ort")
        check_opset(self.opset)
        license_id = self.card_license
        if license_id is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license_id):
            raise ConfigError(
                "card_license",
                f"card_license must be a Hugging Face license id in lower case (apache-2.0, "
                f"mit, cc-by-4.0, other, ...), got {shown(license_id)}",
            )
        for code in self.card_language or []:
            if not re.fullmatch(r"[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*", code):
                raise ConfigError(
                    "card_language",
                    f"card_language must be language codes (en, fr, pt-BR, ...), got {shown(code)}",
                )
        for name in self.card_dataset or []:
            if not name.strip() or name != name.strip() or any(c.isspace() for c in name):
                raise ConfigError(
                    "card_dataset",
                    f"card_dataset must be data set names without spaces (a Hugging Face id "
                    f"such as user/name), got {shown(name)}",
                )
        if self.card_intended_use is not None and not self.card_intended_use.strip():
            raise ConfigError("card_intended_use", "card_intended_use must not be empty")
