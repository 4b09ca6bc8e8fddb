"""``auto`` numerics by measurement (zmdevice.calibrate, zmdevice.training.calibration),
with faked timings: the fastest candidate that labels like fp32 wins, the decision is cached
as JSON, a damaged cache is measured again, explicit flags skip their axis, a resume keeps
its parts' numerics, and a training run keeps bf16 only when measured faster and trains as
if nothing was measured."""

import json

import numpy as np
import pytest
import tiny_teachers
import torch
from helpers import TOPIC_NAMES, text_config, weights, write_texts

from zmdevice import calibrate
from zmdevice import precision as precision_module
from zmdevice.config import LabelConfig
from zmdevice.errors import UserError
from zmdevice.training import calibration

torch.set_num_threads(1)
ALL = ["torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"]


class FakeTimer:
    """Seconds per sample by candidate; ``disagree``: candidates whose labels it shifts by
    one class, ``one_off``: candidates whose first sample's label it shifts (once),
    ``loss_factor``: candidates whose training loss it scales."""

    def __init__(self, seconds: dict, disagree=(), loss_factor=None, one_off=()):
        self.seconds, self.disagree, self.loss_factor = seconds, disagree, loss_factor or {}
        self.one_off = set(one_off)
        self.calls: list[str] = []

    def __call__(self, name, call):
        self.calls.append(name)
        result = call()
        if isinstance(result, float):  # a training step's loss
            return self.seconds[name], result * self.loss_factor.get(name, 1.0)
        probs = np.asarray(result)
        if name in self.disagree:
            probs = np.roll(probs, 1, axis=1)
        if name in self.one_off:
            self.one_off.discard(name)
            probs = probs.copy()
            probs[0] = np.roll(probs[0], 1)
        return self.seconds[name] * len(probs), probs


def no_timer(name, call):
    raise AssertionError(f"measured {name}, but nothing should be measured")


FAST_ONNX = {"torch-fp32": 1e-3, "torch-bf16": 5e-4, "onnx-fp32": 2.5e-4, "onnx-int8": 1e-4}


@pytest.fixture()
def embed(tmp_path, monkeypatch):
    """A tiny text-embed teacher, a private cache folder, a CPU with bf16 instructions and
    calibration allowed on small runs, at any cost."""
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(calibrate, "MIN_LABEL_BATCHES", 1)
    monkeypatch.setattr(calibrate, "BUDGET_SHARE", 1e6)
    return tiny_teachers.make_text_embed(tmp_path / "embed")


def label(tmp_path, embed, monkeypatch, timer, name="out", **values):
    from zmdevice.labeling.run import run_label

    monkeypatch.setattr(calibrate, "measure_call", timer)
    settings = dict(
        data=tmp_path / "texts.csv",
        classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed}",
        out=tmp_path / f"{name}.parquet",
        batch_size=4,
        device="cpu",
        workers=0,
    )
    if not settings["data"].exists():
        write_texts(settings["data"], 24)
    return run_label(LabelConfig(**{**settings, **values}))


def cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "calibration").glob("*.json"))


def test_auto_keeps_the_fastest_candidate_that_labels_like_fp32(embed, tmp_path, monkeypatch,
                                                                capsys):  # fmt: skip
    from zmdevice.pseudolabels import read_pseudolabel_metadata

    timer = FakeTimer(FAST_ONNX, disagree={"onnx-int8"})  # the fastest, but labels otherwise
    summary = label(tmp_path, embed, monkeypatch, timer)
    err = capsys.readouterr().err
    assert f"calibrating the teacher's runtime on 3 batches: {', '.join(ALL)}" in err
    # Each candidate: 3 timed batches (the warm-up batch is not timed), but int8, whose
    # first batch already disagrees beyond the bar, stops there.
    assert timer.calls == [name for name in ALL[:3] for _ in range(3)] + ["onnx-int8"]
    assert (summary["runtime"], summary["precision"]) == ("onnx", "fp32")
    record = summary["calibration"]
    assert record["chosen"] == "onnx-fp32" and record["cached"] is False
    results = record["candidates"]
    assert results["onnx-int8"]["agreement"] == 0.0 and not results["onnx-int8"]["passed"]
    assert results["onnx-int8"]["stopped"] == "after 4 samples: 4 labels off, below the bar already"
    assert results["torch-bf16"]["passed"] and results["torch-bf16"]["speedup"] == 2.0
    assert results["onnx-fp32"]["speedup"] == 4.0 and results["onnx-fp32"]["samples"] == 12
    assert results["onnx-fp32"]["max_abs_prob_diff"] < 1e-3  # the same network in fp32
    assert results["torch-bf16"]["max_abs_prob_diff"] > 0  # bf16 did run
    assert results["torch-fp32"]["seconds_per_sample"] == 1e-3
    assert record["seconds"] > 0  # the real time measuring took, exports included
    assert " measured in " in summary["lines"][3]
    assert "onnx-fp32 chosen, 4.00x torch-fp32" in summary["lines"][3]
    assert "onnx-int8 10.00x (0.00% equal, rejected)" in summary["lines"][3]
    teacher = read_pseudolabel_metadata(tmp_path / "out.parquet")["teacher"]
    assert teacher["calibration"] == record and teacher["runtime"] == "onnx"
    assert teacher["precision_reason"].startswith("auto, measured: onnx-fp32 ran 4.00x")
    (cached,) = cache_files(tmp_path)
    stored = json.loads(cached.read_text())
    assert stored["chosen"] == "onnx-fp32" and stored["identity"]["candidates"] == ALL
    assert stored["identity"]["cpu_bf16"] == ["amx_bf16"]

    # The next run on the same model and machine reads the decision and measures nothing.
    again = label(tmp_path, embed, monkeypatch, no_timer, name="again")
    assert "calibrating" not in capsys.readouterr().err
    del record["seconds"]  # this run spent none
    assert again["calibration"] == {**record, "cached": True}
    assert again["runtime"] == "onnx" and "measured (cached): onnx-fp32" in again["lines"][3]


def test_a_slower_candidate_is_not_chosen_and_torch_bf16_can_win(embed, tmp_path, monkeypatch):
    seconds = {"torch-fp32": 1e-3, "torch-bf16": 2e-4, "onnx-fp32": 9e-4, "onnx-int8": 3e-3}
    timer = FakeTimer(seconds)
    summary = label(tmp_path, embed, monkeypatch, timer)
    assert (summary["runtime"], summary["precision"]) == ("torch", "bf16")
    assert summary["calibration"]["chosen"] == "torch-bf16"
    # Over 1.25x bf16's time after their first batch, the ONNX ones stop: they cannot win.
    assert timer.calls == ["torch-fp32"] * 3 + ["torch-bf16"] * 3 + ["onnx-fp32", "onnx-int8"]
    onnx = summary["calibration"]["candidates"]["onnx-fp32"]
    assert onnx["samples"] == 4 and onnx["stopped"].startswith("after 4 samples: over 1.25x")
    assert "stopped" not in summary["calibration"]["candidates"]["torch-bf16"]
    # Nothing faster than fp32 that agrees: fp32 in torch.
    seconds = {"torch-fp32": 1e-4, "torch-bf16": 2e-4, "onnx-fp32": 9e-4, "onnx-int8": 1e-5}
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "other-cache"))
    slow = label(tmp_path, embed, monkeypatch, FakeTimer(seconds, {"onnx-int8"}), name="slow")
    assert (slow["runtime"], slow["precision"]) == ("torch", "fp32")


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: "{not json",
        lambda text: text.replace('"chosen": "onnx-fp32"', '"chosen": "tvm-int4"'),
        lambda text: text.replace('"torch": "', '"torch": "0.0-'),  # another torch's decision
    ],
)
def test_a_damaged_cache_file_is_ignored_with_a_note_and_measured_again(
    embed, tmp_path, monkeypatch, capsys, damage
):
    label(tmp_path, embed, monkeypatch, FakeTimer(FAST_ONNX, {"onnx-int8"}))
    (cached,) = cache_files(tmp_path)
    cached.write_text(damage(cached.read_text()))
    capsys.readouterr()
    timer = FakeTimer(FAST_ONNX, {"onnx-int8"})
    summary = label(tmp_path, embed, monkeypatch, timer, name="again")
    err = capsys.readouterr().err
    assert f"note: ignoring the calibration cache {cached}" in err and "measuring again" in err
    assert timer.calls and summary["calibration"]["cached"] is False
    assert json.loads(cached.read_text())["chosen"] == "onnx-fp32"  # replaced, whole


@pytest.mark.parametrize(
    ("flags", "measured", "expected"),
    [
        ({"precision": "fp32", "runtime": "torch"}, None, ("fp32", "torch")),
        ({"precision": "bf16"}, None, ("bf16", "torch")),  # one candidate: nothing to measure
        ({"runtime": "onnx-int8"}, None, ("fp32", "onnx-int8")),
        ({"precision": "fp32"}, ["torch-fp32", "onnx-fp32", "onnx-int8"], ("fp32", "onnx")),
        ({"runtime": "torch"}, ["torch-fp32", "torch-bf16"], ("bf16", "torch")),
    ],
)
def test_an_explicit_flag_is_not_measured(embed, tmp_path, monkeypatch, flags, measured,
                                          expected):  # fmt: skip
    timer = FakeTimer(FAST_ONNX, {"onnx-int8"}) if measured else no_timer
    summary = label(tmp_path, embed, monkeypatch, timer, **flags)
    assert (summary["precision"], summary["runtime"]) == expected
    if measured is None:
        assert summary["calibration"] is None and not cache_files(tmp_path)
    else:
        assert sorted(summary["calibration"]["candidates"]) == sorted(measured)
        assert sorted(set(timer.calls)) == sorted(measured)


def test_an_export_a_run_cannot_pay_for_waits_for_a_run_long_enough(embed, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    from zmdevice.classes import load_classes
    from zmdevice.teachers import build_teacher

    teacher = build_teacher(f"text-embed:{embed}", load_classes(TOPIC_NAMES))
    millions = sum(p.numel() for p in teacher.network.module.parameters()) / 1e6
    monkeypatch.setattr(calibrate, "BUDGET_SHARE", 0.05)
    # Exporting: 0.5 ms, quantising 0.5 ms more. At the fake speeds, 24 texts allow 0.6 ms
    # of measuring (5% of 12 ms at bf16's speed), spent by the torch candidates' batches;
    # 2,400 texts allow 60 ms, then 30 ms once onnx-fp32 is measured faster.
    monkeypatch.setattr(calibrate, "EXPORT_SECONDS_PER_MILLION",
                        {"onnx": 5e-4 / millions, "onnx-int8": 5e-4 / millions})  # fmt: skip
    timer = FakeTimer(FAST_ONNX, disagree={"onnx-int8"})
    short = label(tmp_path, embed, monkeypatch, timer)
    record = short["calibration"]
    assert record["chosen"] == "torch-bf16"
    for name in ("onnx-fp32", "onnx-int8"):
        assert "would take measuring past 5% of this run" in record["candidates"][name]["skipped"]
    # The allowance is small: one timed batch each (and one warm-up).
    assert timer.calls == ["torch-fp32", "torch-bf16"]
    assert "not measured: onnx-fp32, onnx-int8 (exporting would cost over 5%" in short["lines"][3]
    assert not list((tmp_path / "cache" / "teachers").glob("*.onnx"))  # nothing exported

    # A run as short reads the decision; a run ten times longer pays for the exports.
    same = label(tmp_path, embed, monkeypatch, no_timer, name="same")
    measured = {k: v for k, v in record.items() if k != "seconds"}
    assert same["calibration"] == {**measured, "cached": True}
    write_texts(tmp_path / "long.csv", 2400)
    timer = FakeTimer(FAST_ONNX, disagree={"onnx-int8"})
    long = label(tmp_path, embed, monkeypatch, timer, name="long", data=tmp_path / "long.csv")
    assert long["calibration"]["chosen"] == "onnx-fp32" and not long["calibration"]["cached"]
    assert set(timer.calls) == set(ALL)
    (stored,) = cache_files(tmp_path)
    assert json.loads(stored.read_text())["chosen"] == "onnx-fp32"
    assert json.loads(stored.read_text())["samples"] == 2400  # the run it was planned for


def test_calibration_batches_are_the_runs_typical_ones(embed, tmp_path):
    from zmdevice.classes import load_classes
    from zmdevice.data import open_dataset
    from zmdevice.labeling.batches import labeling_order
    from zmdevice.teachers import build_teacher

    data = tmp_path / "lengths.csv"
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    with open(data, "w", newline="") as handle:
        handle.write("id,text\n" + "".join(f"t{i},{' '.join(['word'] * n)}\n"
                                           for i, n in enumerate(lengths)))  # fmt: skip
    dataset = open_dataset(data, modality="text")
    teacher = build_teacher(f"text-embed:{embed}", load_classes(TOPIC_NAMES))
    indices = list(range(len(lengths)))
    batches = calibrate.calibration_batches(dataset, teacher, indices, 8)
    assert len(batches) == calibrate.CALIBRATION_BATCHES
    order = labeling_order(dataset, indices, teacher)
    padded = [batch["input_ids"].shape[1] for batch in batches]
    shortest = teacher.collate([teacher.prepare(dataset.texts[i]) for i in order[:8]])
    longest = teacher.collate([teacher.prepare(dataset.texts[i]) for i in order[-8:]])
    # Sorted by length as the run labels them, spread over it: neither end of the order.
    assert shortest["input_ids"].shape[1] < padded[0] < padded[1] < padded[2]
    assert padded[2] < longest["input_ids"].shape[1]


def test_one_label_off_in_a_few_batches_is_no_evidence_against_a_fast_candidate(
    embed, tmp_path, monkeypatch
):
    seconds = {"torch-fp32": 1e-3, "torch-bf16": 2e-4, "onnx-fp32": 5e-4, "onnx-int8": 1e-4}
    timer = FakeTimer(seconds, disagree={"onnx-int8"}, one_off={"torch-bf16"})
    record = label(tmp_path, embed, monkeypatch, timer)["calibration"]
    bf16 = record["candidates"]["torch-bf16"]
    assert bf16["agreement"] == 11 / 12 and bf16["passed"] and record["chosen"] == "torch-bf16"
    assert bf16["below_bar_p"] == pytest.approx(1 - 0.995**12)
    assert "stopped" not in bf16  # 1 off in its first 4 samples: not yet below the bar
    assert not record["candidates"]["onnx-int8"]["passed"]  # every label off: below the bar


def test_the_agreement_bar_is_a_test_on_the_samples_measured():
    assert calibrate.below_bar_p(0, 192) == 1.0
    assert calibrate.below_bar_p(1, 192) == pytest.approx(1 - 0.995**192)  # 0.62: passes
    assert calibrate.below_bar_p(8, 192) < 1e-4  # MiniLM int8 on the bf16 EPYC: rejected
    assert calibrate.below_bar_p(10, 2000) > calibrate.SIGNIFICANCE  # at the bar
    assert calibrate.below_bar_p(25, 2000) < calibrate.SIGNIFICANCE  # 98.75%: below it


def test_without_enough_data_or_in_a_shard_the_table_decides(embed, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "MIN_LABEL_BATCHES", 7)  # 24 texts at batch 4: 6 batches
    small = label(tmp_path, embed, monkeypatch, no_timer)
    # The table's choice for a text teacher on a CPU with bf16 instructions (the fixture's).
    assert small["calibration"] is None and (small["precision"], small["runtime"]) == (
        "bf16",
        "torch",
    )
    monkeypatch.setattr(calibrate, "MIN_LABEL_BATCHES", 1)
    shard = label(tmp_path, embed, monkeypatch, no_timer, name="shard", shard="0/2")
    assert shard["calibration"] is None and not cache_files(tmp_path)


def test_a_failed_export_is_recorded_and_left_out(embed, tmp_path, monkeypatch):
    from zmdevice import onnx_teacher

    monkeypatch.setattr(onnx_teacher, "PARITY_TOLERANCE", -1.0)  # every export disagrees
    summary = label(tmp_path, embed, monkeypatch, FakeTimer(FAST_ONNX))
    results = summary["calibration"]["candidates"]
    assert "disagrees with PyTorch" in results["onnx-fp32"]["error"]
    assert "error" in results["onnx-int8"]
    assert summary["calibration"]["chosen"] == "torch-bf16"
    assert "onnx-fp32 failed" in summary["lines"][3]


def test_a_resume_keeps_the_numerics_of_its_parts(embed, tmp_path, monkeypatch, capsys):
    from zmdevice.labeling import run as label_module
    from zmdevice.pseudolabels import read_pseudolabels

    write_part = label_module.write_part

    def killed_after_one_part(parts_dir, number, *args):
        if number > 0:
            raise KeyboardInterrupt
        write_part(parts_dir, number, *args)

    monkeypatch.setattr(label_module, "write_part", killed_after_one_part)
    monkeypatch.setattr(label_module, "CHUNK_BATCHES", 16)
    # Batch 1: chunks of 16 texts, 2 for 24; the first is written, then the run dies.
    with pytest.raises(KeyboardInterrupt):
        label(tmp_path, embed, monkeypatch, FakeTimer(FAST_ONNX, {"onnx-int8"}), batch_size=1)
    monkeypatch.setattr(label_module, "write_part", write_part)
    first = next(iter(cache_files(tmp_path)))
    first.unlink()  # a new measurement would now be needed, and could choose otherwise
    with pytest.raises(UserError, match=r"--resume: .*precision fp32, runtime onnx"):
        label(tmp_path, embed, monkeypatch, no_timer, batch_size=1, resume=True,
              runtime="torch")  # fmt: skip
    capsys.readouterr()
    summary = label(tmp_path, embed, monkeypatch, no_timer, batch_size=1, resume=True)
    assert "calibrating" not in capsys.readouterr().err
    assert summary["count"] == 24 and summary["runtime"] == "onnx"
    assert summary["calibration"]["chosen"] == "onnx-fp32"
    assert summary["calibration"]["cached"] is False  # the record of the interrupted run
    assert read_pseudolabels(tmp_path / "out.parquet").metadata["teacher"]["runtime"] == "onnx"


# ----------------------------------------------------------------------------- training


@pytest.fixture()
def bf16_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(calibration, "MIN_TRAIN_STEPS", 1)


def setup_of(config, out, monkeypatch, timer):
    from zmdevice.config import resolve_student
    from zmdevice.training.run import build_setup

    monkeypatch.setattr(calibrate, "measure_call", timer)
    return build_setup(resolve_student(config), out)


@pytest.mark.parametrize(
    ("seconds", "loss_factor", "expected"),
    [
        ({"fp32": 1.0, "bf16": 0.5}, {}, "bf16"),
        ({"fp32": 1.0, "bf16": 1.5}, {}, "fp32"),  # measured slower: fp32
        ({"fp32": 1.0, "bf16": 0.5}, {"bf16": 1.2}, "fp32"),  # faster, but its loss strays
    ],
)
def test_training_keeps_bf16_only_when_faster_and_its_loss_agrees(
    text_data,
    tmp_path,
    monkeypatch,
    bf16_cpu,
    seconds,
    loss_factor,
    expected,
):
    timer = FakeTimer(seconds, loss_factor=loss_factor)
    setup = setup_of(text_config(text_data, tmp_path / "a"), tmp_path / "a", monkeypatch, timer)
    # fp32 then bf16, each a warm-up step and 3 timed steps from the same weights.
    assert timer.calls == ["fp32"] * 4 + ["bf16"] * 4
    assert setup.precision.name == expected == setup.config.precision
    assert setup.precision.reason.startswith(f"auto, measured: {expected} steps")
    # The measurement left no trace: the same weights and random streams as a forced run.
    after = torch.rand(4)
    forced = setup_of(
        text_config(text_data, tmp_path / "b", precision=expected),
        tmp_path / "b",
        monkeypatch,
        no_timer,
    )
    torch.testing.assert_close(after, torch.rand(4), rtol=0, atol=0)
    ours, theirs = setup.student.state_dict(), forced.student.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)

    cached = setup_of(text_config(text_data, tmp_path / "c"), tmp_path / "c", monkeypatch,
                      no_timer)  # fmt: skip
    assert cached.precision.name == expected
    assert cached.precision.reason.startswith(f"auto, cached measurement: {expected}")


def test_a_calibrated_training_run_trains_as_the_forced_one(text_data, tmp_path, monkeypatch,
                                                            bf16_cpu):  # fmt: skip
    from zmdevice.training.run import run_train

    monkeypatch.setattr(calibrate, "measure_call", FakeTimer({"fp32": 1.0, "bf16": 0.4}))
    auto = run_train(text_config(text_data, tmp_path / "auto", kd_steps=4, ssl_steps=4))
    assert auto["precision"] == "bf16"
    assert any("precision bf16 (auto, measured: bf16 steps 2.50x" in x for x in auto["lines"])
    monkeypatch.setattr(calibrate, "measure_call", no_timer)
    run_train(text_config(text_data, tmp_path / "bf16", kd_steps=4, ssl_steps=4,
                          precision="bf16"))  # fmt: skip
    a, b = weights(tmp_path / "auto"), weights(tmp_path / "bf16")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_training_without_bf16_or_with_few_steps_uses_the_table(text_data, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    monkeypatch.setattr(calibration, "MIN_TRAIN_STEPS", 1)
    config = text_config(text_data, tmp_path / "a")
    assert setup_of(config, tmp_path / "a", monkeypatch, no_timer).precision.name == "fp32"
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(calibration, "MIN_TRAIN_STEPS", 21)  # 10 + 10 steps: too short
    setup = setup_of(text_config(text_data, tmp_path / "b"), tmp_path / "b", monkeypatch,
                     no_timer)  # fmt: skip
    assert setup.precision.reason == "auto: transformer on a CPU with bf16 instructions"


def test_candidates_are_the_runtimes_each_teacher_class_declares(monkeypatch):
    """``teacher_candidates`` takes a kind's ONNX runtimes from its registered class
    (``runtimes()``), on a CPU only."""
    import importlib.util

    from zmdevice.teachers import list_teachers, teacher_class

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # as if onnxruntime were installed
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "onnxruntime" else find_spec(name, *a),
    )
    cpu, gpu = precision_module.Hardware("cpu"), precision_module.Hardware("cuda", cuda_bf16=True)
    seen = set()
    for kind in list_teachers():
        runtimes = teacher_class(kind).runtimes()
        seen.update(runtimes)
        onnx = [name for name in ("onnx", "onnx-int8") if name in runtimes]
        want = ["torch-fp32"] + [{"onnx": "onnx-fp32"}.get(name, name) for name in onnx]
        names = [c.name for c in calibrate.teacher_candidates("auto", "auto", cpu, kind)]
        assert names == want, kind
        on_gpu = calibrate.teacher_candidates("auto", "auto", gpu, kind)
        assert [c.runtime for c in on_gpu] == ["torch"] * 3, kind
    assert seen == {"torch", "onnx", "onnx-int8"}  # every branch taken by some kind
