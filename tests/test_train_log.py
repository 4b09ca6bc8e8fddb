"""``train --log tensorboard|mlflow`` (the API's ``log=``): a tiny real run, its tracker read
back through each library's own reader and compared with the run's ``metrics.jsonl``."""

from __future__ import annotations

import sys
import tomllib

import pytest
from helpers import FAST, image_config, read_jsonl, weights
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.errors import UserError
from zmdevice.trackers import scalars
from zmdevice.training.run import run_train

TINY = dict(kd_steps=4, ssl_steps=4, log_every=2, eval_every=2, checkpoint_every=0)
"""Two steps between records: a handful of records in each stage, in seconds."""
TRACKER_FILES = ("tensorboard", "mlflow.db", "mlartifacts")


def expected_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """``STAGE/NAME`` -> [(global_step, value)] of every number in metrics.jsonl."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(out / "metrics.jsonl"):
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["global_step"], value))
    return expected


def test_tensorboard_holds_every_metrics_record_the_report_and_the_curves(image_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    summary = run_train(image_config(image_data, out, log="tensorboard", **TINY))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    expected = expected_scalars(out)
    assert {"kd/loss", "ssl/loss", "kd/heldout_agreement"} <= set(expected)
    for key, points in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in logged] == [step for step, _ in points], key
        for (_, value), (_, want) in zip(logged, points, strict=True):
            assert value == pytest.approx(want, rel=1e-6, abs=1e-7), key  # float32 in events
    final = events.Scalars("final/test_accuracy")
    assert [(e.step, e.value) for e in final] == [
        (8, pytest.approx(summary["test_accuracy"], rel=1e-6))
    ]
    assert "curves" in events.Tags()["images"]
    assert {"config/text_summary", "report.md/text_summary"} <= set(events.Tags()["tensors"])


def test_mlflow_run_holds_the_settings_the_metrics_and_the_artifacts(
    image_data, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ml"
    summary = run_train(image_config(image_data, out, log="mlflow", **TINY))
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("zmdevice").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    params = run.data.params
    assert params["method"] == "zeromatch" and params["kd_steps"] == "4"
    assert params["precision"] == "fp32" and params["log"] == "mlflow"  # resolved settings
    expected = expected_scalars(out)
    for key in ("kd/loss", "ssl/loss", "kd/heldout_agreement"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == expected[key], key
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(summary["test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "curves.png"} <= artifacts
    assert (out / "mlartifacts").is_dir()


def test_a_run_that_raises_closes_its_mlflow_run_as_failed(image_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{(tmp_path / 'store.db').resolve()}"  # outlives the run folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    def crash(setup, state, values):
        if state["global_step"] == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_train(image_config(image_data, tmp_path / "m", log="mlflow", **TINY), on_step=crash)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("zmdevice").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kd/loss")] == [2]


def test_a_missing_tracker_package_is_one_user_error_before_training(
    image_data, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    steps = []
    config = image_config(image_data, tmp_path / "m", log="mlflow", **TINY)
    with pytest.raises(UserError, match=r"--log mlflow needs the mlflow package: pip install"):
        run_train(config, on_step=lambda *args: steps.append(1))
    assert steps == [] and not (tmp_path / "m").exists()


def test_cli_refuses_an_unknown_tracker_in_one_line(image_data, tmp_path):
    args = ["train", "--labeled", str(image_data / "labeled"), "--unlabeled",
            str(image_data / "unlabeled"), "--pseudo-labels", str(image_data / "labels.parquet"),
            "--student", "tiny-cnn", "--out", str(tmp_path / "m"), "--log", "wandb"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "log" in result.output and "tensorboard" in result.output
    assert not (tmp_path / "m").exists()


def test_log_none_writes_the_same_run_and_no_tracker_files(image_data, tmp_path):
    """The same run with log="none" (the default) and, through the API, log="tensorboard"."""
    pytest.importorskip("tensorboard")
    import zmdevice

    plain, logged = tmp_path / "plain", tmp_path / "logged"
    run_train(image_config(image_data, plain, **TINY))
    zmdevice.train(image_data / "labeled", image_data / "unlabeled", image_data / "labels.parquet",
                   student="tiny-cnn", device="cpu", out=logged, test=image_data / "test",
                   progress=False, log="tensorboard", **{**FAST, **TINY})  # fmt: skip
    assert not any((plain / name).exists() for name in TRACKER_FILES)
    assert (logged / "tensorboard").is_dir()
    assert (plain / "metrics.jsonl").read_text() == (logged / "metrics.jsonl").read_text()
    assert {k: v.tolist() for k, v in weights(plain).items()} == {
        k: v.tolist() for k, v in weights(logged).items()
    }
    names = {path.name for path in plain.iterdir()}
    assert names | {"tensorboard"} == {path.name for path in logged.iterdir()}
    settings = [tomllib.loads((out / "train_config.toml").read_text()) for out in (plain, logged)]
    assert [values.pop("log") for values in settings] == ["none", "tensorboard"]
    assert [values.pop("out") for values in settings] == [str(plain), str(logged)]
    assert settings[0] == settings[1]


def test_overwrite_clears_the_previous_runs_tracker_files(image_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "m"
    run_train(image_config(image_data, out, log="tensorboard", **TINY))
    with pytest.raises(UserError, match="holds another run"):
        run_train(image_config(image_data, out, **TINY))
    run_train(image_config(image_data, out, overwrite=True, **TINY))
    assert not (out / "tensorboard").exists()
