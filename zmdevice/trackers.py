"""Experiment trackers: what a run writes to ``metrics.jsonl``, also in TensorBoard or MLflow.

``zmdevice train --log tensorboard|mlflow`` (the API's ``log=``) opens one tracker for the
run. It receives the resolved config as parameters, every metrics record at its global step,
the report and the curves as artifacts at the end, and the final evaluation. Both libraries
are optional extras (``pip install 'zmdevice[log]'``), imported only when a tracker opens.

Where the records go: TensorBoard event files under ``OUT/tensorboard/`` (``tensorboard
--logdir OUT/tensorboard``); MLflow runs in ``$MLFLOW_TRACKING_URI`` when set (a server or
a store the user chose), else a local SQLite store ``OUT/mlflow.db`` with the artifacts in
``OUT/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``), experiment
``zmdevice``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from zmdevice.errors import UserError

TRACKERS = ("tensorboard", "mlflow")
"""The values of ``--log`` besides none."""
EXPERIMENT = "zmdevice"
"""The MLflow experiment every run is logged under."""
LOCAL_STORE = "mlflow.db"
"""The SQLite store under the run folder when ``$MLFLOW_TRACKING_URI`` is not set."""
LOCAL_ARTIFACTS = "mlartifacts"
"""Where that store keeps the artifacts (under the run folder)."""
MAX_PARAM_CHARS = 500
"""MLflow rejects longer parameter values (its limit varies by store); longer ones are cut."""


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, keyed ``STAGE/NAME`` (``kd/loss``).

    Bookkeeping fields (the step counters, the stage's index) and anything that is not a
    number (lists of class counts, strings, booleans) stay in ``metrics.jsonl`` only.
    """
    stage = record.get("stage", "run")
    skip = {"stage", "stage_index", "step", "global_step"}
    return {
        f"{stage}/{key}": float(value)
        for key, value in record.items()
        if key not in skip
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as flat ``a.b`` -> string parameters (None -> "none")."""
    params = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flat_params(value, f"{name}."))
        else:
            text = (
                "none" if value is None else value if isinstance(value, str) else json.dumps(value)
            )
            params[name] = text[:MAX_PARAM_CHARS]
    return params


class TensorBoardTracker:
    """Event files under ``OUT/tensorboard`` written by ``torch.utils.tensorboard``."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError as error:  # torch's writer needs the tensorboard package
            raise missing_extra("tensorboard") from error
        self.folder = Path(out) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def log_params(self, config: dict) -> None:
        params = flat_params(config)
        table = "\n".join(f"| {key} | {value} |" for key, value in sorted(params.items()))
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, 0)

    def log_record(self, record: dict) -> None:
        step = int(record.get("global_step", 0))
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, values: dict, step: int) -> None:
        for key, value in scalars({"stage": "final", **values}).items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(path.stem, pixels, 0, dataformats="HWC")
        else:
            self.writer.add_text(path.name, path.read_text(encoding="utf-8"), 0)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run through ``MlflowClient`` (no global active run is left behind)."""

    def __init__(self, out: Path, run_name: str):
        try:
            from mlflow.tracking import MlflowClient
        except ModuleNotFoundError as error:
            raise missing_extra("mlflow") from error
        out = Path(out).resolve()
        # MLflow 3 keeps its file store in maintenance mode (refused unless opted in), so the
        # local default is a SQLite store beside the run, its artifacts in a folder next to it.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / LOCAL_STORE}"
        local = uri == f"sqlite:///{out / LOCAL_STORE}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
        except ModuleNotFoundError as error:  # the SQLite store needs sqlalchemy and alembic
            raise missing_extra("mlflow") from error
        if experiment:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (out / LOCAL_ARTIFACTS).as_uri() if local else None
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        self.uri = uri
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in sorted(flat_params(config).items())]
        for start in range(0, len(params), 100):  # the client's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_record(self, record: dict) -> None:
        self._log_metrics(scalars(record), int(record.get("global_step", 0)))

    def log_summary(self, values: dict, step: int) -> None:
        self._log_metrics(scalars({"stage": "final", **values}), step)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


EXTRA_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic"}
"""What ``zmdevice[log]`` installs for each tracker."""


def missing_extra(module: str) -> UserError:
    return UserError(
        f"--log {module} needs the {module} package: pip install 'zmdevice[log]' "
        f"(or pip install {EXTRA_PACKAGES[module]})"
    )


def open_tracker(kind: str | None, out: Path, run_name: str):
    """The tracker ``--log KIND`` names, or None for no tracker."""
    if kind in (None, "none"):
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(out)
    if kind == "mlflow":
        return MLflowTracker(out, run_name)
    raise UserError(f"unknown --log {kind!r}; choose none, {', '.join(TRACKERS)}")


@contextlib.contextmanager
def run_tracker(kind: str | None, out: Path):
    """The tracker of a training run in ``out`` (named after the folder), or None.

    Closed when the run ends, as failed (then the error goes on) when it raises. A missing
    package is the tracker's one-line UserError, raised here, before the first step.
    """
    tracker = open_tracker(kind, out, Path(out).resolve().name)
    if tracker is None:
        yield None
        return
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()


def log_final(tracker, summary: dict, step: int, out: Path) -> None:
    """The end of a run in its tracker: the final evaluation (--test's accuracy and
    macro-F1, held-out agreement) at the last global step, then report.md and curves.png."""
    names = ("test_accuracy", "test_macro_f1", "heldout_agreement")
    values = {name: summary[name] for name in names if summary.get(name) is not None}
    if values:
        tracker.log_summary(values, step)
    for name in ("report.md", "curves.png"):
        if (Path(out) / name).is_file():
            tracker.log_artifact(Path(out) / name)
