"""``--log tensorboard|mlflow``: records, parameters and artifacts read back through each
library's own reader (TensorBoard's event accumulator, MLflow's client on a local store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zmdevice.errors import UserError
from zmdevice.trackers import flat_params, open_tracker, scalars

RECORDS = [
    {"stage": "kd", "stage_index": 0, "step": 10, "global_step": 10, "loss": 2.5, "lr": 1e-4},
    {"stage": "kd", "stage_index": 0, "step": 20, "global_step": 20, "loss": 1.5, "lr": 9e-5},
    {"stage": "ssl", "stage_index": 1, "step": 10, "global_step": 30, "loss": 0.7,
     "mask_rate": 0.25, "guard_class_counts": [3, 4], "guard_labels_mostly_right": True},
]  # fmt: skip
CONFIG = {"method": "zeromatch", "kd_steps": 20, "lr": 1e-4, "teacher": None,
          "data": {"labeled": "l.csv"}}  # fmt: skip


def test_scalars_keep_the_finite_numbers_under_their_stage():
    assert scalars(RECORDS[2]) == {"ssl/loss": 0.7, "ssl/mask_rate": 0.25}
    assert scalars({"stage": "kd", "loss": float("nan"), "global_step": 3}) == {}
    assert flat_params(CONFIG) == {
        "method": "zeromatch", "kd_steps": "20", "lr": "0.0001", "teacher": "none",
        "data.labeled": "l.csv",
    }  # fmt: skip


def write_run(tracker, tmp_path):
    (tmp_path / "report.md").write_text("# report\nall good\n")
    from PIL import Image

    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "curves.png")
    tracker.log_params(CONFIG)
    for record in RECORDS:
        tracker.log_record(record)
    tracker.log_summary({"accuracy": 0.8125}, step=30)
    tracker.log_artifact(tmp_path / "report.md")
    tracker.log_artifact(tmp_path / "curves.png")
    tracker.close()


def test_tensorboard_event_files_hold_every_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(open_tracker("tensorboard", tmp_path, "run"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"kd/loss", "kd/lr", "ssl/loss", "ssl/mask_rate", "final/accuracy"} <= set(
        events.Tags()["scalars"]
    )
    assert [(e.step, e.value) for e in events.Scalars("kd/loss")] == [(10, 2.5), (20, 1.5)]
    assert events.Scalars("final/accuracy")[0].value == pytest.approx(0.8125)
    assert "curves" in events.Tags()["images"]
    texts = events.Tags()["tensors"]  # add_text is stored as a string tensor
    assert {"config/text_summary", "report.md/text_summary"} <= set(texts)


def test_mlflow_run_holds_params_metrics_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = open_tracker("mlflow", tmp_path, "zeromatch-run")
    write_run(tracker, tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "zeromatch-run"
    assert run.data.params["method"] == "zeromatch" and run.data.params["data.labeled"] == "l.csv"
    history = client.get_metric_history(tracker.run_id, "kd/loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 1.5)]
    assert run.data.metrics["final/accuracy"] == pytest.approx(0.8125)
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"report.md", "curves.png"}
    local = client.download_artifacts(tracker.run_id, "report.md", str(tmp_path / "down"))
    assert Path(local).read_text() == "# report\nall good\n"
    assert json.loads(json.dumps(run.data.params))  # plain strings, no objects


def test_unknown_tracker_is_refused():
    with pytest.raises(UserError, match="unknown --log 'wandb'; choose none, tensorboard, mlflow"):
        open_tracker("wandb", None, "run")
    assert open_tracker(None, None, "run") is None
