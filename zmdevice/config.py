"""Typed configs, one dataclass per stage; defaults are written here and nowhere else.

The CLI and ``--config`` TOML files map onto these; conflicts are rejected in
``__post_init__`` with a ``UserError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from zmdevice.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
METHODS = ("zeromatch", "kd", "supervised", "fixmatch", "adamatch", "naive-pl")


def check_device(device: str) -> str:
    """Accept auto, cpu, cuda, cuda:N or mps; anything else is a user error."""
    base = device.split(":", 1)[0]
    if base not in DEVICES or (":" in device and not (base == "cuda" and device[5:].isdigit())):
        raise UserError(f"unknown device '{device}': use one of auto, cpu, cuda, cuda:N, mps")
    return device


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
    """Output Parquet file; default labels/<data name>-<teacher>.parquet."""
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

    def __post_init__(self):
        check_device(self.device)
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}")


@dataclass
class TrainConfig:
    """`zmdevice train`: ZeroMatch (stage 1 KD, stage 2 SSL + auxiliary KD) and baselines."""

    labeled: Path
    """Labeled data (the few true labels)."""
    unlabeled: Path
    """Unlabeled training data (the labeled samples are part of it too)."""
    pseudo_labels: Path | None = None
    """Pseudo-label file from `zmdevice label` (required by methods that use the FM)."""
    student: str = "mobilenet_v3_small"
    """Student preset from the catalog, or a hub id / local dir for distilbert."""
    out: Path | None = None
    """Output folder; default models/<student>-<method>."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    method: str = "zeromatch"
    """zeromatch, kd, supervised, fixmatch, adamatch or naive-pl."""
    kd_steps: int | None = None
    """Stage-1 steps; None = the student's CPU default."""
    ssl_steps: int | None = None
    """Stage-2 steps; None = the student's CPU default."""
    seed: int = 0
    """Seed for weights, sampling and augmentation."""
    resume: bool = False
    """Continue exactly from the last checkpoint in ``out``."""
    test: Path | None = None
    """Optional labeled test data evaluated periodically."""
    soft_labels: bool | None = None
    """Beyond the paper: KL to the FM's probabilities instead of CE on hard labels."""
    allow_partial: bool = False
    """Train on the intersection when the pseudo-label file misses some ids."""
    extra: dict = field(default_factory=dict)
    """Further hyper-parameters (batch sizes, lr, ...), owned by zmdevice.train."""

    def __post_init__(self):
        check_device(self.device)
        if self.method not in METHODS:
            raise UserError(f"unknown --method '{self.method}': use one of {', '.join(METHODS)}")
        for name in ("kd_steps", "ssl_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def load_train_config(config_file: Path | None, overrides: dict) -> TrainConfig:
    """Build a TrainConfig from an optional TOML file plus CLI values (CLI wins if set).

    Keys of the file that are not TrainConfig fields go to ``extra`` (hyper-parameters).
    """
    values: dict = {}
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UserError(f"config file not found: {config_file}")
        try:
            values = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"config file {config_file} is not valid TOML: {error}") from None
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = dict(values.pop("extra", {}))
    extra.update({k: values.pop(k) for k in list(values) if k not in field_names})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        # A CLI value replaces the file's only when it differs from the flag's default.
        if key not in values or value != defaults.get(key):
            values[key] = value
    for key in ("labeled", "unlabeled", "pseudo_labels", "out", "test"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return TrainConfig(**values, extra=extra)


@dataclass
class ExportConfig:
    """`zmdevice export`: a trained student to one ONNX file (+ optional int8 variant)."""

    model_dir: Path
    """Trained student folder (models/NAME)."""
    out: Path | None = None
    """Output .onnx; default export/<NAME>.onnx."""
    quantize: str | None = None
    """None or 'int8'."""
    test: Path | None = None
    """Labeled test data to compare int8 against fp32."""
    calibration: Path | None = None
    """Calibration images for static int8 (default: the student's training data)."""
    opset: int = 18
    """ONNX opset version."""

    def __post_init__(self):
        if self.quantize not in (None, "int8"):
            raise UserError(f"unknown --quantize '{self.quantize}': the only choice is int8")
