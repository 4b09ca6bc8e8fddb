"""--time-budget on tiny students: the plan, the stop on time, resume, bad budgets.

A fake clock that advances a fixed tick on every reading makes the measured step times and
the stop deterministic: the probe reads it once per step, the run once per step too.
"""

import tomllib

import pytest
from helpers import image_config, read_jsonl, weights
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.errors import UserError
from zmdevice.training.run import run_train


class FakeClock:
    """Seconds that advance ``tick`` on every reading."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def budget_config(image_data, out, **changes):
    # One minute at 0.5 s per fake step: a few dozen steps per stage.
    return image_config(image_data, out, **{"time_budget": 1.0, **changes})


def test_budget_plans_from_measured_steps_and_trains_like_the_planned_run(image_data, tmp_path):
    summary = run_train(budget_config(image_data, tmp_path / "budget"), clock=FakeClock(0.5))
    plan = summary["time_budget"]
    assert plan["step_seconds"] == {"kd": 0.5, "ssl": 0.5}
    kd, ssl = plan["steps"]["kd"], plan["steps"]["ssl"]
    assert kd > 10 and kd == ssl  # kd_steps:ssl_steps = 10:10
    # Most of the minute is used: the plan also counts evaluations (measured at one tick
    # each), which read no clock in the run, and keeps 5% plus two evaluations in reserve.
    assert 0.7 * 60 < plan["used_seconds"] <= 60
    assert [stage["steps"] for stage in summary["stages"]] == [kd, ssl]
    assert summary["stopped"] is None
    assert any("time budget 1 min: planned kd" in line for line in summary["lines"])
    saved = tomllib.loads((tmp_path / "budget" / "train_config.toml").read_text())
    assert (saved["kd_steps"], saved["ssl_steps"], saved["time_budget"]) == (kd, ssl, 1.0)
    records = read_jsonl(tmp_path / "budget" / "metrics.jsonl")
    assert records[0]["time_budget_plan"]["steps"] == {"kd": kd, "ssl": ssl}

    # The probe leaves no trace: same weights as a run told the planned steps.
    run_train(image_config(image_data, tmp_path / "plain", kd_steps=kd, ssl_steps=ssl))
    planned, plain = weights(tmp_path / "budget"), weights(tmp_path / "plain")
    assert all(planned[name].equal(plain[name]) for name in plain)


def test_the_plan_keeps_time_for_the_batchnorm_recalibration(image_data, tmp_path):
    # Recalibrating on the whole unlabeled pool before saving can outlast a short budget's
    # training (EfficientNet-Lite0, 10,000 images: 15-40 s), so the probe times one batch
    # and the plan keeps that time for every batch. 48 pool images in batches of 4: 12.
    def plan(name, batches=40):
        config = budget_config(
            image_data, tmp_path / name, eval_batch_size=4, bn_recalibration_batches=batches
        )
        return run_train(config, clock=FakeClock(0.5))["time_budget"]

    kept, skipped = plan("kept"), plan("skipped", batches=0)
    assert kept["recalibration_seconds"] == 12 * 0.5 and skipped["recalibration_seconds"] == 0
    assert kept["steps"]["kd"] < skipped["steps"]["kd"]
    assert kept["used_seconds"] <= 60


def test_budget_split_follows_the_configured_ratio(image_data, tmp_path):
    config = budget_config(image_data, tmp_path / "out", kd_steps=10, ssl_steps=30)
    steps = run_train(config, clock=FakeClock(0.5))["time_budget"]["steps"]
    assert abs(steps["ssl"] - 3 * steps["kd"]) <= 3


def test_slower_steps_than_measured_stop_on_time_and_still_finish(image_data, tmp_path):
    clock = FakeClock(0.5)

    def slow_down(setup, state, values):
        clock.tick = 4.0  # every real step now costs 8x the probe's

    out = tmp_path / "out"
    summary = run_train(budget_config(image_data, out), on_step=slow_down, clock=clock)
    plan = summary["time_budget"]
    assert summary["stopped"] == "time budget"
    assert summary["stages"][0]["steps"] < plan["steps"]["kd"]
    assert [stage["stage"] for stage in summary["stages"]] == ["kd"]  # no time for stage 2
    # Stopped once at most the reserve was left: over by at most the step that crossed it
    # and the summary's own clock reading (one tick each).
    assert 60 - 4.0 < plan["used_seconds"] <= 60 + 2 * 4.0
    assert any("stopped on time" in line for line in summary["lines"])
    assert (out / "student.safetensors").is_file() and (out / "report.md").is_file()
    assert any(record.get("time_budget_stop") for record in read_jsonl(out / "metrics.jsonl"))


def test_resume_continues_the_recorded_plan(image_data, tmp_path):
    whole = run_train(budget_config(image_data, tmp_path / "whole"), clock=FakeClock(0.5))
    out = tmp_path / "split"
    stopped = run_train(budget_config(image_data, out, stop_after=15), clock=FakeClock(0.5))
    assert stopped["stopped_at"] == 15
    # A faster clock would plan more steps: a resume must not plan again.
    resumed = run_train(budget_config(image_data, out, resume=True), clock=FakeClock(0.1))
    assert resumed["time_budget"]["steps"] == whole["time_budget"]["steps"]
    assert [s["steps"] for s in resumed["stages"]] == [s["steps"] for s in whole["stages"]]
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert all(got[name].equal(expected[name]) for name in expected)
    with pytest.raises(UserError, match="time_budget"):
        run_train(
            budget_config(image_data, tmp_path / "whole", resume=True, time_budget=2.0),
            clock=FakeClock(0.5),
        )


def test_a_budget_too_short_to_train_is_one_user_error(image_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="leaves no time to train"):
        run_train(budget_config(image_data, out, time_budget=0.1), clock=FakeClock(0.5))
    assert not (out / "metrics.jsonl").exists() and not (out / "student.safetensors").exists()


def test_cli_time_budget_flag_is_checked(image_data, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--labeled", str(image_data / "labeled"),
            "--unlabeled", str(image_data / "unlabeled"),
            "--pseudo-labels", str(image_data / "labels.parquet"),
            "--student", "tiny-cnn",
            "--out", str(tmp_path / "out"),
            "--time-budget", "0",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--time-budget" in result.output and "> 0" in result.output
