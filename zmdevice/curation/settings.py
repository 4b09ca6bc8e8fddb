"""The settings of the labeling loop's commands, `zmdevice suggest` and `zmdevice check`.

Kept apart from ``zmdevice.config`` (the pipeline's three stages) and from the commands'
modules (which import numpy): the CLI builds its flags from these fields and their
docstrings (``zmdevice.cli_options``) without importing any of the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zmdevice.config import ConfigError, DataOptions, at_least, check_fields

FORMATS = ("csv", "label-studio")
"""``suggest --format``: a CSV to fill in, or Label Studio tasks with pre-annotations."""
METHODS = ("confident", "cleanlab")
"""``check --method``: our confident-learning ranking, or cleanlab's ``find_label_issues``."""


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """Where both commands get the FM's view of the data (``curation.fm_space``)."""

    teacher: str | None = None
    """FM for the features; default: the label file's teacher."""
    features: Path | None = None
    """A .npy file of features [N, D] in the data's row order, instead of the teacher."""
    device: str = "cpu"
    """Where the teacher (on a feature-cache miss) and the student run."""
    batch_size: int = 64
    """Teacher and student batch size."""
    data_options: DataOptions = field(default_factory=DataOptions)
    """Column names and corrupt-image policy."""

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, *self.AT_LEAST_ONE)

    AT_LEAST_ONE = ("batch_size",)
    """The integer settings that must be >= 1."""


@dataclass(frozen=True)
class SuggestConfig(FeatureSettings):
    """`zmdevice suggest`: rank unlabeled samples to label next."""

    data: Path
    """Unlabeled data (text table, image folder or image table) the label file labels."""
    pseudo_labels: Path
    """The `zmdevice label` output for the data (its FM probabilities)."""
    out: Path | None = None
    """Output file: a CSV, or Label Studio tasks JSON with format label-studio; default
    suggestions.csv (.json) in the working folder."""
    labeled: Path | None = None
    """Labels so far: a labeled table or a Label Studio JSON export (excluded, and used)."""
    student: Path | None = None
    """A trained student folder whose predictions join the committee."""
    n: int = 50
    """How many samples to suggest."""
    exclude: list[str] | None = None
    """Ids never to suggest (repeatable): an id, a comma list, an id file or a suggestions CSV."""
    seed: int = 0
    """Seed of the cold start's clustering (results are identical for a seed)."""
    format: str = "csv"
    """Output format: csv, or label-studio (import-ready tasks with FM pre-annotations)."""
    image_url_prefix: str = "/data/local-files/?d="
    """Label Studio tasks: prefix of each image's path relative to the data folder."""
    cold_start_per_class: int = 2
    """Without a student, fewer labels per class than this means a cold start."""
    candidates: int = 5
    """Later rounds pick for diversity among the n x this most uncertain samples."""

    AT_LEAST_ONE = ("n", "candidates", "batch_size")

    def __post_init__(self):
        super().__post_init__()
        if self.cold_start_per_class < 0:
            raise ConfigError("cold_start_per_class", "cold_start_per_class must be >= 0")
        if self.format not in FORMATS:
            raise ConfigError("format", f"format must be one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class CheckConfig(FeatureSettings):
    """`zmdevice check`: flag labeled examples that look mislabeled."""

    labeled: Path
    """The labels to check: a labeled table or a Label Studio JSON export."""
    data: Path
    """Unlabeled data the label file labels (for the pseudo-label suspects)."""
    pseudo_labels: Path
    """The `zmdevice label` output for the data (its teacher gives the features)."""
    out: Path | None = None
    """Output CSV: the labeled examples, most suspicious first; default label-check.csv in
    the working folder."""
    student: Path | None = None
    """A trained student folder whose probabilities are averaged with the probe's."""
    folds: int = 5
    """Cross-validation folds (stratified; fewer when the classes are small)."""
    seed: int = 0
    """Seed of the fold assignment."""
    method: str = "confident"
    """Ranking: confident (our confident learning) or cleanlab (needs the cleanlab package)."""
    l2: float = 1e-3
    """L2 penalty on the probe's weights."""
    probe_dims: int | None = 128
    """Principal directions of the features the probe sees; None: all."""
    max_iter: int = 100
    """L-BFGS iterations per probe fit."""

    AT_LEAST_ONE = ("max_iter", "batch_size")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 2, "folds")
        if self.probe_dims is not None and self.probe_dims < 1:
            raise ConfigError("probe_dims", "probe_dims must be >= 1 or None")
        if self.l2 < 0:
            raise ConfigError("l2", f"l2 must be >= 0, got {self.l2}")
        if self.method not in METHODS:
            raise ConfigError("method", f"method must be one of {', '.join(METHODS)}")
