"""The training loop end to end on tiny students and tiny synthetic data (seconds, offline).

Covers every --method, seed reproducibility, exact resume (litgpt style: stop a run
mid-stage, resume, compare with an uninterrupted run), the output layout, the CLI and the
documented user errors. The data (``conftest.text_data`` / ``image_data``) are written by
the real writers (CSV tables, PNG folders, ``PseudoLabelWriter``), with a fake FM that is
right 70% of the time.
"""

import dataclasses
import json
import tomllib

import pytest
import torch
from helpers import (
    FAST,
    TEXT_CLASSES,
    image_config,
    read_jsonl,
    text_config,
    weights,
    write_table,
)
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.errors import UserError
from zmdevice.training.loop import stage_plan
from zmdevice.training.run import run_train
from zmdevice.training.stages import METHOD_STAGES, DistillStage, SSLStage

# --------------------------------------------------------------------------- methods


def test_each_method_is_one_entry_in_both_tables_and_they_agree():
    """config.METHODS (validation, help) and the stage objects of training.stages name the
    same methods, with the same stage names (metrics.jsonl's ``stage``) and FM use."""
    from zmdevice.config import METHODS

    assert list(METHOD_STAGES) == list(METHODS)
    for name, stages in METHOD_STAGES.items():
        assert tuple(stage.name for stage in stages) == METHODS[name].stages, name
        assert any(stage.uses_fm for stage in stages) == METHODS[name].uses_fm, name


def test_a_handler_that_ends_the_stage_stops_the_handlers_after_it(text_data, tmp_path):
    """Loop events: a True result ends the stage at once; later handlers of that event and
    later steps do not run, and the stage-end handlers still do."""
    from zmdevice.config import resolve_student
    from zmdevice.training.loop import Loop, NullLog, begin_stage, new_state
    from zmdevice.training.run import build_setup

    config = resolve_student(text_config(text_data, tmp_path / "run", method="supervised"))
    setup = build_setup(config, tmp_path / "run")
    seen = []
    loop = Loop(setup, NullLog())
    loop.add_callback("on_step_end", lambda loop, state: seen.append(state["step"]))
    loop.add_callback("on_step_end", lambda loop, state: state["step"] == 3)
    loop.add_callback("on_step_end", lambda loop, state: seen.append("after"))
    loop.add_callback("on_stage_end", lambda loop, state: seen.append("end"))
    state = new_state(setup)
    begin_stage(setup, state)
    loop.run_stage(state)
    assert seen == [1, "after", 2, "after", 3, "end"]
    assert state["stage_summaries"][0]["steps"] == 3


# --------------------------------------------------------------------------- whole runs


def test_zeromatch_text_writes_the_documented_layout(text_data, tmp_path):
    from zmdevice.students import load_student

    out = tmp_path / "model"
    summary = run_train(text_config(text_data, out))
    for name in (
        "student.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "train_config.toml",
        "report.md",
        "curves.png",
        "checkpoints/last.json",
    ):
        assert (out / name).is_file(), name
    assert [stage["stage"] for stage in summary["stages"]] == ["kd", "ssl"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    records = read_jsonl(out / "metrics.jsonl")
    ssl = [r for r in records if r["stage"] == "ssl" and "loss" in r]
    # Named losses of stage 2: L_s, L_u, L_KD2, mask rate, alpha (ramp ends at 1).
    assert {"loss", "sup", "unsup", "kd", "mask_rate", "alpha", "pl_accuracy"} <= set(ssl[-1])
    assert ssl[-1]["alpha"] == 1.0
    assert any("heldout_agreement" in r for r in records if r["stage"] == "kd")
    assert not any(name.startswith("kd_head") for name in weights(out))
    student = load_student(out)
    assert student.kd_head is None and student.classes == TEXT_CLASSES
    assert "## Test" in (out / "report.md").read_text()


@pytest.mark.parametrize("method", [name for name in METHOD_STAGES if name != "zeromatch"])
def test_every_baseline_runs_from_the_same_pieces(image_data, tmp_path, method):
    summary = run_train(image_config(image_data, tmp_path / method, method=method))
    expected = [stage.name for stage in METHOD_STAGES[method]]
    assert [stage["stage"] for stage in summary["stages"]] == expected
    records = [r for r in read_jsonl(tmp_path / method / "metrics.jsonl") if "loss" in r]
    keys = set(records[-1])
    if method in ("fixmatch", "adamatch"):
        assert {"sup", "unsup", "mask_rate"} <= keys and "kd" not in keys
    if method == "supervised":
        assert "sup" in keys and "unsup" not in keys
    if method == "naive-pl":
        assert {"sup", "unsup"} <= keys and "mask_rate" not in keys
    if method != "kd":
        # Single-stage baselines run --ssl-steps steps.
        assert summary["stages"][0]["steps"] == 10


def test_zeromatch_options_soft_labels_fixmatch_constant_alpha_stage_two_rates(
    image_data, tmp_path
):
    config = image_config(
        image_data,
        tmp_path / "m",
        soft_labels=True,
        ssl_loss="fixmatch",
        alpha="constant",
        grad_clip=1.0,
        ssl_lr_scale=0.25,
        early_stop_agreement=1.0,
    )
    run_train(config)
    records = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    assert all(r["alpha"] == 1.0 for r in records if r["stage"] == "ssl" and "alpha" in r)
    # Both stages have 10 steps and the same schedule: stage 2 peaks at a quarter of the rate.
    rates = {(r["stage"], r["step"]): r["lr"] for r in records if "lr" in r}
    steps = [step for stage, step in rates if stage == "ssl" and ("kd", step) in rates]
    assert steps and all(
        rates["ssl", step] == pytest.approx(0.25 * rates["kd", step]) for step in steps
    )


def test_weight_average_ends_stage_two_on_the_ema_and_resumes_exactly(text_data, tmp_path):
    """ssl_weight_average 1 on a 10-step stage 2: horizon 10 steps, each step moves the
    average a tenth of the way to the weights, starting at stage 1's selected weights."""
    start, steps = {}, []

    def record(setup, state, values):
        if isinstance(stage_plan(setup, state), DistillStage) and state["step"] == 10:
            start.update(state["best"]["state"])
        elif isinstance(stage_plan(setup, state), SSLStage):
            steps.append({k: v.detach().clone() for k, v in setup.student.state_dict().items()})

    settings = dict(ssl_weight_average=1.0, early_stop_agreement=1.0)
    run_train(text_config(text_data, tmp_path / "full", **settings), on_step=record)
    saved = weights(tmp_path / "full")
    assert len(steps) == 10 and set(saved) <= set(start)
    expected = {key: start[key].clone() for key in saved}
    for live in steps:
        for key in expected:
            expected[key] = torch.lerp(expected[key], live[key], 0.1)
    assert all(torch.allclose(saved[key], expected[key], atol=1e-6) for key in saved)
    assert not all(torch.allclose(saved[key], steps[-1][key], atol=1e-4) for key in saved)
    records = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    averaged = [r["step"] for r in records if "average_test_accuracy" in r]
    assert averaged == [5, 10]

    # Stopped in stage 2 (the average is in the checkpoint), resumed: the same weights.
    run_train(text_config(text_data, tmp_path / "split", stop_after=13, **settings))
    run_train(text_config(text_data, tmp_path / "split", resume=True, **settings))
    resumed = weights(tmp_path / "split")
    assert all(torch.equal(saved[key], resumed[key]) for key in saved)


def test_stage_one_keeps_the_best_held_out_weights_and_stops_early(image_data, tmp_path):
    summary = run_train(image_config(image_data, tmp_path / "kd", method="kd", kd_steps=20))
    records = read_jsonl(tmp_path / "kd" / "metrics.jsonl")
    agreements = [r["heldout_agreement"] for r in records if "heldout_agreement" in r]
    assert summary["heldout_agreement"] == pytest.approx(max(agreements))
    early = run_train(
        image_config(
            image_data,
            tmp_path / "early",
            method="kd",
            kd_steps=20,
            early_stop_agreement=-1.0,
        )
    )
    assert early["stages"][0]["steps"] == 5  # first evaluation already "agrees"


def test_same_seed_same_result_other_seed_other_result(image_data, tmp_path):
    run_train(image_config(image_data, tmp_path / "a", seed=3))
    # b also keeps its decoded images in a memory-mapped file instead of RAM.
    run_train(image_config(image_data, tmp_path / "b", seed=3, image_cache_gb=0))
    assert not list((tmp_path / "b").glob(".image-cache-*"))
    run_train(image_config(image_data, tmp_path / "c", seed=4))
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_text()
    assert not all(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_resume_continues_exactly(image_data, text_data, tmp_path, modality):
    make = image_config if modality == "image" else text_config
    root = image_data if modality == "image" else text_data
    run_train(make(root, tmp_path / "full"))

    # Interrupted in stage 2 (checkpoint written at the stop), then resumed. Image views
    # are built 4 steps at a time: step 3 of stage 2 leaves one batch drawn but unused.
    stopped = run_train(make(root, tmp_path / "split", stop_after=13))
    assert stopped["stopped_at"] == 13 and not (tmp_path / "split" / "config.json").exists()
    run_train(make(root, tmp_path / "split", resume=True))

    # A crash in stage 1 after the periodic checkpoint at step 5: steps 6-7 are redone.
    def crash(setup, state, values):
        if state["global_step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(make(root, tmp_path / "crash", checkpoint_every=5), on_step=crash)
    run_train(make(root, tmp_path / "crash", resume=True, checkpoint_every=5))

    full = weights(tmp_path / "full")
    for name in ("split", "crash"):
        resumed = weights(tmp_path / name)
        assert all(torch.equal(full[key], resumed[key]) for key in full), name
        assert (tmp_path / name / "metrics.jsonl").read_text() == (
            tmp_path / "full" / "metrics.jsonl"
        ).read_text()


# --------------------------------------------------------------------------- the CLI


def test_cli_train_prints_summary_and_json(image_data, tmp_path):
    config = tmp_path / "hyper.toml"
    config.write_text("\n".join(f"{k} = {v}" for k, v in FAST.items()) + "\n")
    args = [
        "train",
        "--labeled",
        str(image_data / "labeled"),
        "--unlabeled",
        str(image_data / "unlabeled"),
        "--pseudo-labels",
        str(image_data / "labels.parquet"),
        "--student",
        "tiny-cnn",
        "--out",
        str(tmp_path / "m"),
        "--device",
        "cpu",
        "--kd-steps",
        "4",
        "--ssl-steps",
        "4",
        "--config",
        str(config),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["method"] == "zeromatch" and summary["out"] == str(tmp_path / "m")


def test_cli_bad_input_is_one_line_exit_2(image_data, tmp_path):
    args = [
        "train",
        "--labeled",
        str(image_data / "labeled"),
        "--unlabeled",
        str(image_data / "unlabeled"),
        "--student",
        "tiny-cnn",
        "--out",
        str(tmp_path / "m"),
        "--device",
        "cpu",
        "--teacher",
        "nope",  # no --pseudo-labels: the run labels its data first, with this teacher
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "pseudo_labels.parquet").exists()


# --------------------------------------------------------------------------- user errors


def test_error_pseudo_labels_for_other_data(image_data, tmp_path):
    from PIL import Image

    other = tmp_path / "unlabeled"
    other.mkdir()
    for path in sorted((image_data / "unlabeled").iterdir()):
        Image.open(path).resize((24, 24)).save(other / path.name)  # same ids, other content
    with pytest.raises(UserError, match="made from other data"):
        run_train(image_config(image_data, tmp_path / "m", unlabeled=other))


def test_error_pseudo_labels_missing_ids_name_allow_partial(image_data, tmp_path):
    from PIL import Image

    bigger = tmp_path / "unlabeled"
    bigger.mkdir()
    for path in sorted((image_data / "unlabeled").iterdir()):
        Image.open(path).save(bigger / path.name)
    Image.new("RGB", (20, 20)).save(bigger / "new.png")
    with pytest.raises(UserError, match="allow-partial"):
        run_train(image_config(image_data, tmp_path / "m", unlabeled=bigger))


def test_error_pseudo_labels_for_other_classes(text_data, tmp_path):
    labeled = tmp_path / "labeled.csv"
    write_table(labeled, [("s0", "dog cat", "animal"), ("s1", "tree", "vehicle")])
    with pytest.raises(UserError, match="unknown label 'vehicle'"):
        run_train(text_config(text_data, tmp_path / "m", labeled=labeled))
    with pytest.raises(UserError, match="class"):
        run_train(text_config(text_data, tmp_path / "m", classes=["a", "b", "c"]))


def test_a_class_without_labeled_example_is_taught_by_the_fm_alone(text_data, tmp_path, capsys):
    labeled = tmp_path / "labeled.csv"
    write_table(labeled, [("s0", "dog cat", "animal"), ("s1", "tree", "plant")])
    # Without the FM nothing would teach the class: refused before any training.
    with pytest.raises(UserError, match="no example of class.*'food'.*supervised"):
        run_train(
            text_config(
                text_data,
                tmp_path / "s",
                labeled=labeled,
                method="supervised",
                classes=["animal", "plant", "food"],
            )  # fmt: skip
        )
    assert not (tmp_path / "s").exists()
    # ZeroMatch learns it from the pseudo-labels (as a few `suggest` rounds leave a class
    # unlabeled): it trains, says so, and the model knows every class.
    summary = run_train(text_config(text_data, tmp_path / "z", labeled=labeled))
    assert "only the FM's pseudo-labels teach them" in capsys.readouterr().err
    assert "food" in summary["classes"]


def test_error_fewer_unlabeled_than_a_batch(text_data, tmp_path):
    with pytest.raises(UserError, match="fewer than one"):
        run_train(text_config(text_data, tmp_path / "m", kd_batch_size=500))


def test_error_unknown_student_method_setting_and_resume(text_data, tmp_path):
    with pytest.raises(UserError, match="unknown --student 'nope'"):
        run_train(text_config(text_data, tmp_path / "m", student="nope"))
    with pytest.raises(UserError, match="no checkpoint"):
        run_train(text_config(text_data, tmp_path / "fresh", resume=True))


# --------------------------------------------------------------------------- pipeline pieces


def test_weak_view_is_a_padded_crop_or_its_mirror():
    import torch.nn.functional as F

    from zmdevice.pipeline import weak_augment

    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    out = weak_augment(images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    for b in range(6):
        crops = [padded[b, :, y : y + 16, x : x + 16] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)


def test_image_views_batch_weak_and_strong_groups_together():
    """One fused pad-crop-flip over weak + strong groups: weak rows stay crops of the image."""
    import torch.nn.functional as F

    from zmdevice.pipeline import ImageViews

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    views = ImageViews(pixels, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    idx = torch.tensor([3, 1, 4, 1])
    out = views.batch([("weak", idx), ("strong", idx)])["pixel_values"]
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    clean = views.batch([("clean", idx)])["pixel_values"]
    padded = F.pad(clean, (2, 2, 2, 2), mode="reflect")

    def is_crop_of(image, b):
        crops = [padded[b, :, y : y + 16, x : x + 16] for y in range(5) for x in range(5)]
        return any(
            torch.allclose(image, c, atol=1e-5) or torch.allclose(image, c.flip(-1), atol=1e-5)
            for c in crops
        )

    assert all(is_crop_of(out[b], b) for b in range(4))
    # The strong rows went through RandAugment first: not all of them are plain crops.
    assert not all(is_crop_of(out[4 + b], b) for b in range(4))


def test_image_cache_spills_to_an_unlinked_memory_map(image_data, tmp_path):
    from zmdevice.data import open_dataset
    from zmdevice.pipeline import cache_images

    dataset = open_dataset(image_data / "unlabeled")
    in_memory = cache_images(dataset, 12)
    spilled = cache_images(dataset, 12, spill_dir=tmp_path / "spill", memory_budget=0)
    assert in_memory.shape == (len(dataset), 3, 12, 12) and in_memory.dtype == torch.uint8
    assert torch.equal(in_memory, spilled)
    assert list((tmp_path / "spill").iterdir()) == []  # mapped, then unlinked
    assert torch.equal(
        in_memory, cache_images(dataset, 12, spill_dir=tmp_path, memory_budget=10**9)
    )


def test_sampler_covers_each_epoch_and_resumes_its_stream():
    from zmdevice.pipeline import Sampler

    sampler = Sampler(10, 4, seed=1)
    first = torch.cat([sampler.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    state = sampler.state_dict()
    ahead = [sampler.next() for _ in range(3)]
    clone = Sampler(10, 4, seed=99)
    clone.load_state_dict(state)
    assert all(torch.equal(a, clone.next()) for a in ahead)


def test_labeled_images_join_the_pool_by_file_name(image_data, tmp_path):
    from zmdevice.students import build_student
    from zmdevice.training.data import build_data, load_data

    config = image_config(image_data, tmp_path / "m").for_modality("image")
    classes, labeled, unlabeled, pseudo, test = load_data(config)
    student = build_student("tiny-cnn", classes)
    data = build_data(config, student, classes, labeled, unlabeled, pseudo, test)
    # labeled/<class>/007.png is the pool's 007.png: same cache row, FM label known (L_KD2).
    assert bool((data.labeled_index < data.num_pool).all())
    assert bool((data.labeled_fm >= 0).all())
    assert len(data.holdout) + len(data.kd_train) == data.num_pool


def test_gold_unlabeled_must_cover_the_pool(text_data, tmp_path):
    config = text_config(text_data, tmp_path / "m", gold_unlabeled=text_data / "test.csv")
    with pytest.raises(UserError, match="gold_unlabeled .* lacks 45 ids"):
        run_train(config)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["mobilenet_v3_small", "distilbert"])
def test_real_students_train_and_resume_a_few_steps(image_data, text_data, tmp_path, student):
    make = image_config if student.startswith("mobilenet") else text_config
    root = image_data if student.startswith("mobilenet") else text_data
    settings = dict(student=student, kd_steps=3, ssl_steps=3)
    full = run_train(make(root, tmp_path / "full", **settings))
    run_train(make(root, tmp_path / "split", stop_after=4, **settings))
    run_train(make(root, tmp_path / "split", resume=True, **settings))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert 0.0 <= full["test_accuracy"] <= 1.0


def test_without_pseudo_labels_train_makes_them_from_the_labeled_examples(
    text_data, embed_dir, tmp_path
):
    """No --pseudo-labels: the run labels the pool first with the teacher and the labeled
    examples (the label source chosen by cross-validation), into its own folder, and
    trains on that file; a resume reuses it and --overwrite keeps the one it just made."""
    from zmdevice.pseudolabels import read_pseudolabels

    out = tmp_path / "auto"
    config = text_config(
        text_data, out, pseudo_labels=None, teacher=f"text-embed:{embed_dir}", stop_after=12
    )
    run_train(config)
    labels = read_pseudolabels(out / "pseudo_labels.parquet")
    decision = labels.metadata["teacher"]["label_source"]
    assert decision["how"] == "cross-validation" and decision["scored"] == 6
    assert labels.metadata["teacher"]["name"] == f"text-embed:{embed_dir}"
    saved = tomllib.loads((out / "train_config.toml").read_text())
    assert saved["pseudo_labels"] == str(out / "pseudo_labels.parquet")
    before = (out / "pseudo_labels.parquet").stat().st_mtime_ns
    resumed = run_train(dataclasses.replace(config, stop_after=None, resume=True))
    assert (out / "pseudo_labels.parquet").stat().st_mtime_ns == before
    assert resumed["stopped"] is None
    again = run_train(dataclasses.replace(config, stop_after=None, overwrite=True))
    assert (out / "pseudo_labels.parquet").is_file()
    assert any(line.startswith("  pseudo-labels made with text-embed:") for line in again["lines"])


def test_zero_shot_pseudo_labels_get_a_note_about_the_labeled_examples(text_data, tmp_path):
    summary = run_train(text_config(text_data, tmp_path / "zs"))
    assert any(
        "these pseudo-labels are the FM's zero-shot ones" in line for line in summary["lines"]
    )
