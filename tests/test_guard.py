"""The stage-2 collapse guard on tiny students: it only observes a healthy run, and on a
forced collapse it warns, logs, and rolls back (or stops).

Half of the pool is held out so the slice is large enough for the rule to be judged
(``guard.MIN_HELDOUT``); the tiny image student gets enough stage-1 steps to predict every
class before stage 2 (with 10 it still predicts one class, and there is nothing to lose).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import image_config, read_jsonl, text_config, weights

from zmdevice.config import TrainConfig
from zmdevice.errors import UserError
from zmdevice.train import run_train
from zmdevice.training.guard import class_entropy, collapse_reason

JUDGED = {
    "image": dict(holdout_fraction=0.5, kd_steps=30, lr=5e-3, head_lr=5e-3),
    "text": dict(holdout_fraction=0.5),
}


def make_config(modality, data, out, **changes):
    build = image_config if modality == "image" else text_config
    return build(data, out, **{**JUDGED[modality], **changes})


@pytest.fixture(params=["image", "text"])
def case(request):
    """(modality, data folder) of the tiny image and text runs."""
    return request.param, request.getfixturevalue(f"{request.param}_data")


def test_guard_only_observes_a_healthy_run(case, tmp_path):
    modality, data = case
    guarded = run_train(make_config(modality, data, tmp_path / "on"))
    run_train(make_config(modality, data, tmp_path / "off", collapse_guard="off"))
    assert guarded["stopped"] is None and "collapse" not in guarded
    assert any("collapse guard: no collapse" in line for line in guarded["lines"])
    on, off = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert sorted(on) == sorted(off) and all(on[name].equal(off[name]) for name in on)
    observed = [
        r for r in read_jsonl(tmp_path / "on" / "metrics.jsonl") if "guard_class_entropy" in r
    ]
    # Before stage 2's first step, then at every evaluation (eval_every = 5, 10 steps).
    assert [r["step"] for r in observed] == [0, 5, 10]
    assert {"guard_heldout_agreement", "guard_labeled_accuracy"} <= set(observed[0])
    unobserved = read_jsonl(tmp_path / "off" / "metrics.jsonl")
    assert not any("guard_class_entropy" in r for r in unobserved)


def last_linear(module) -> torch.nn.Linear:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]


def collapse_after(step):
    """An on_step that, after stage-2 ``step``, pushes every main-head prediction into
    class 0."""

    def force(setup, state, values):
        if setup.plans[state["stage_index"]].kind == "ssl" and state["step"] == step:
            with torch.no_grad():
                last_linear(setup.student.head).bias[0] = 1e4

    return force


force_collapse = collapse_after(2)


def test_forced_collapse_rolls_back_to_the_best_weights(case, tmp_path, capsys):
    modality, data = case
    out = tmp_path / "out"
    summary = run_train(make_config(modality, data, out), on_step=force_collapse)
    assert summary["stopped"] == "collapse"
    fired = summary["collapse"]
    # Suspected at step 5, confirmed at step 10 (the stage's last evaluation acts at once),
    # rolled back to 0.
    assert fired["step"] == 10 and fired["action"] == "rollback" and fired["rolled_back_to"] == 0
    assert "fell to" in fired["reason"]
    assert summary["stages"][-1] == {**summary["stages"][-1], "stage": "ssl", "steps": 10}
    assert any(line.startswith("  COLLAPSE at stage-2 step 10") for line in summary["lines"])
    assert "warning: collapse at stage-2 step 10" in capsys.readouterr().err
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "collapse_suspected" in r] == [5]
    assert [r["collapse_action"] for r in records if "collapse" in r] == ["rollback"]
    # The saved head is the pre-collapse one and predicts more than one class.
    from zmdevice.students import load_student

    student = load_student(out)
    assert float(last_linear(student.head).bias[0].detach()) < 100
    assert (out / "report.md").is_file()


def test_a_rollback_wins_over_the_weight_average(text_data, tmp_path):
    """The average still holds the forced bias (about 1e4 x (1 - 0.9^8)); the guard's
    rollback restores the weights before it."""
    out = tmp_path / "out"
    config = make_config("text", text_data, out, ssl_weight_average=1.0)
    summary = run_train(config, on_step=force_collapse)
    assert summary["collapse"]["action"] == "rollback"
    from zmdevice.students import load_student

    assert float(last_linear(load_student(out).head).bias[0].detach()) < 100


def test_a_breach_that_does_not_last_is_only_logged(image_data, tmp_path):
    """Every prediction forced into class 0 after stage-2 step 2 and released after step 6:
    the evaluation at step 5 breaks the rule, the one at step 10 does not."""
    kept = {}

    def dip(setup, state, values):
        if setup.plans[state["stage_index"]].kind != "ssl":
            return
        bias = last_linear(setup.student.head).bias
        with torch.no_grad():
            if state["step"] == 2:
                kept["bias"] = float(bias[0])
                bias[0] = 1e4
            elif state["step"] == 6:
                bias[0] = kept["bias"]

    out = tmp_path / "out"
    summary = run_train(make_config("image", image_data, out), on_step=dip)
    assert summary["stopped"] is None and "collapse" not in summary
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "collapse_suspected" in r] == [5]
    observed = [r["step"] for r in records if "guard_class_entropy" in r]
    assert observed == [0, 5, 10]


def test_forced_collapse_with_stop_keeps_the_weights(image_data, tmp_path):
    out = tmp_path / "out"
    config = make_config("image", image_data, out, collapse_guard="stop")
    summary = run_train(config, on_step=force_collapse)
    assert summary["collapse"]["action"] == "stop" and summary["collapse"]["rolled_back_to"] is None
    assert float(weights(out)["head.bias"][0]) > 100


def test_forced_collapse_with_distill_spends_the_rest_on_distillation(image_data, tmp_path):
    """ssl_steps 30: suspected at stage-2 step 5, acted on at 15 (patience 3), rolled back to
    step 0, then 15 steps of stage-1 distillation; a run interrupted in that stage resumes
    into it exactly."""
    settings = dict(collapse_guard="distill", ssl_steps=30)
    whole = tmp_path / "whole"
    summary = run_train(make_config("image", image_data, whole, **settings), force_collapse)
    fired = summary["collapse"]
    assert (fired["action"], fired["step"], fired["rolled_back_to"]) == ("distill", 15, 0)
    assert fired["distill_steps"] == 15 and summary["stopped"] is None
    assert [(s["stage"], s["steps"]) for s in summary["stages"]] == [
        ("kd", 30),
        ("ssl", 15),
        ("kd", 15),
    ]
    assert any("distils the FM for the 15 steps" in line for line in summary["lines"])
    records = read_jsonl(whole / "metrics.jsonl")
    assert {r["stage"] for r in records if r["stage_index"] == 2} == {"kd"}
    saved = weights(whole)
    assert not any(name.startswith("kd_head") for name in saved)
    assert float(saved["head.bias"][0]) < 100
    # Stop in the distillation stage (30 + 15 + 7 steps in all), then resume.
    split = tmp_path / "split"
    run_train(make_config("image", image_data, split, stop_after=52, **settings), force_collapse)
    resumed = run_train(make_config("image", image_data, split, resume=True, **settings))
    assert resumed["collapse"] == fired
    assert [s["stage"] for s in resumed["stages"]] == ["kd", "ssl", "kd"]
    got = weights(split)
    assert all(got[name].equal(saved[name]) for name in saved)


def test_config_rigged_collapse_is_caught(image_data, tmp_path):
    """FixMatch on every pseudo-label (threshold 0), weighted 50x, with a head learning rate
    of 0.5: stage 2 drives the main head into one class."""
    rigged = dict(ssl_loss="fixmatch", threshold=0.0, lambda_u=50.0, head_lr=0.5, ssl_steps=40)
    entropy_only = dict(collapse_agreement_drop=None)
    summary = run_train(make_config("image", image_data, tmp_path / "on", **rigged, **entropy_only))
    fired = summary["collapse"]
    assert "entropy" in fired["reason"] and fired["rolled_back_to"] == 0 and fired["step"] < 40
    off = run_train(
        make_config("image", image_data, tmp_path / "off", collapse_guard="off", **rigged)
    )
    assert off["stages"][-1]["steps"] == 40 and "collapse" not in off
    records = read_jsonl(tmp_path / "on" / "metrics.jsonl")
    observed = [r for r in records if "guard_heldout_agreement" in r]
    suspected = [r["step"] for r in records if "collapse_suspected" in r]
    # collapse_patience = 3: two evaluations suspected it before the third acted.
    assert suspected == [fired["step"] - 10, fired["step"] - 5]
    # Agreement fell long before the entropy did, and the default rule judges it too: the
    # same run stops earlier, on agreement.
    start = observed[0]["guard_heldout_agreement"]
    fell = next(r["step"] for r in observed if r["guard_heldout_agreement"] < start - 0.15)
    assert fell < suspected[0]
    # A stricter agreement rule acting after two evaluations stops at the second breach.
    strict = dict(collapse_agreement_drop=0.1, collapse_patience=2)
    stricter = run_train(make_config("image", image_data, tmp_path / "strict", **rigged, **strict))
    breach = next(r["step"] for r in observed if r["guard_heldout_agreement"] < start - 0.1)
    assert stricter["collapse"]["step"] == breach + 5
    assert "agreement" in stricter["collapse"]["reason"]
    default = run_train(make_config("image", image_data, tmp_path / "default", **rigged))
    assert "agreement" in default["collapse"]["reason"]
    assert default["collapse"]["step"] < fired["step"]


def test_resume_keeps_the_guard_memory(image_data, tmp_path):
    whole = run_train(make_config("image", image_data, tmp_path / "whole"))
    out = tmp_path / "split"
    run_train(make_config("image", image_data, out, stop_after=37))  # stage-2 step 7
    resumed = run_train(make_config("image", image_data, out, resume=True))
    assert resumed["stopped"] is None and whole["stopped"] is None
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert all(got[name].equal(expected[name]) for name in expected)
    guard_records = [r for r in read_jsonl(out / "metrics.jsonl") if "guard_class_entropy" in r]
    assert [r["step"] for r in guard_records] == [0, 5, 10]
    # A collapse after the resume rolls back to weights remembered before the interruption.
    again = tmp_path / "again"
    run_train(make_config("image", image_data, again, stop_after=37))
    resumed = run_train(make_config("image", image_data, again, resume=True), collapse_after(8))
    assert resumed["collapse"]["step"] == 10 and resumed["collapse"]["rolled_back_to"] in (0, 5)


def test_the_rule_on_given_signals():
    config = TrainConfig(labeled="l", unlabeled="u")  # entropy share 0.5, agreement drop 0.15
    memory = {"best_agreement": 0.80, "highest_entropy": 1.0}
    assert "agreement" in collapse_reason(config, {"guard_heldout_agreement": 0.64,
                                                   "guard_class_entropy": 0.9}, memory)  # fmt: skip
    healthy = {"guard_heldout_agreement": 0.71, "guard_class_entropy": 0.51}
    assert collapse_reason(config, healthy, memory) is None
    drifted = {**healthy, "guard_heldout_agreement": 0.69}
    assert collapse_reason(config, drifted, memory) is None
    unjudged = TrainConfig(labeled="l", unlabeled="u", collapse_agreement_drop=0.0)
    far = {"guard_heldout_agreement": 0.10, "guard_class_entropy": 0.9}
    assert collapse_reason(unjudged, far, memory) is None
    strict = TrainConfig(labeled="l", unlabeled="u", collapse_agreement_drop=0.10)
    assert collapse_reason(strict, healthy, memory) is None
    agreement = collapse_reason(strict, drifted, memory)
    assert "agreement" in agreement and "69.0%" in agreement
    entropy = collapse_reason(config, {**healthy, "guard_class_entropy": 0.49}, memory)
    assert "entropy" in entropy
    # Without an FM only the entropy is judged.
    no_fm = {"highest_entropy": 1.0}
    assert collapse_reason(config, {"guard_class_entropy": 0.49}, no_fm) is not None
    assert collapse_reason(config, {"guard_class_entropy": 0.51}, no_fm) is None


def load_replay():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "guard_replay.py"
    spec = importlib.util.spec_from_file_location("guard_replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replaying_the_rule_on_a_log_matches_the_live_guard(image_data, tmp_path):
    """benchmarks/guard_replay.py chooses the rule on dev from logs of runs whose guard did
    not fire: on such a log it must fire where the live guard fires, with the same rollback."""
    live = run_train(make_config("image", image_data, tmp_path / "live"), force_collapse)
    never = dict(collapse_entropy_fraction=0.0, collapse_agreement_drop=0.0)  # logs, never acts
    run_train(make_config("image", image_data, tmp_path / "log", **never), force_collapse)
    replay = load_replay()
    trajectory = replay.trajectory(tmp_path / "log")
    assert [e["step"] for e in trajectory["evaluations"]] == [0, 5, 10]
    defaults = TrainConfig(labeled="l", unlabeled="u")
    rule = {key: getattr(defaults, key) for key in replay.SHIPPED}
    outcome = replay.replay(rule, trajectory)
    assert (outcome["fired_at"], outcome["rolled_back_to"]) == (
        live["collapse"]["step"],
        live["collapse"]["rolled_back_to"],
    )
    assert replay.replay(rule | never, trajectory)["fired_at"] is None
    # The live guard acted at the stage's last evaluation, after logging it: its log is whole.
    assert replay.replay(rule, replay.trajectory(tmp_path / "live")) == outcome
    # One that acts earlier cuts the stage short, and its log cannot be replayed.
    early = run_train(make_config("image", image_data, tmp_path / "early", ssl_steps=20),
                      force_collapse)  # fmt: skip
    assert early["collapse"]["step"] < 20 and replay.trajectory(tmp_path / "early") is None


def test_class_entropy():
    assert class_entropy(torch.tensor([0, 0, 0, 0]), 3) == 0.0
    assert class_entropy(torch.tensor([0, 1, 2]), 3) == pytest.approx(torch.log(torch.tensor(3.0)))


def test_guard_settings_are_checked(image_data, tmp_path):
    with pytest.raises(UserError, match="collapse_guard"):
        make_config("image", image_data, tmp_path, collapse_guard="sometimes")
    with pytest.raises(UserError, match="collapse_entropy_fraction"):
        make_config("image", image_data, tmp_path, collapse_entropy_fraction=1.5)
