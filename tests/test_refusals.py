"""Hostile input and failing environments end in one line before damage is done: process
counts, time budgets, class priors, Ray addresses, one-class few-shot sets, full disks."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, TEXT_CLASSES, image_config, snapshot

from zmdevice.classes import ClassList, check_few_shot_classes, load_class_prior
from zmdevice.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


# ------------------------------------------------------------------ process counts


def test_a_process_count_above_the_usable_cores_is_refused_before_anything_starts(monkeypatch):
    import torch.distributed.run

    from zmdevice.training import distributed

    def must_not_start(args):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(torch.distributed.run, "run", must_not_start)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(UserError, match="--nproc 100000: .* use 2 CPU core.*at most 2$"):
        distributed.launch(100000, ["train", "--nproc", "100000"])
    with pytest.raises(UserError, match="--nproc 3: "):
        distributed.launch(3, ["train"])


def test_torchrun_started_ranks_above_the_cores_are_refused(monkeypatch):
    from zmdevice.training.distributed import Ranks

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    monkeypatch.delenv("ZMDEVICE_RANK_ERRORS", raising=False)
    import torch

    with pytest.raises(UserError, match="torchrun --nproc-per-node 64: .*at most 1"):
        Ranks(3, 64).start(torch.device("cpu"))


def test_a_rank_error_is_said_once(monkeypatch, tmp_path, capsys):
    from zmdevice.errors import FlagHint
    from zmdevice.training.distributed import Ranks, first_rank_error, worker_errors

    error = UserError("bad batch", hint=FlagHint("--config", "fix it in --config"))
    monkeypatch.delenv("ZMDEVICE_RANK_ERRORS", raising=False)
    with pytest.raises(UserError, match="bad batch"), worker_errors(Ranks(0, 2)):
        raise error  # plain torchrun: rank 0 raises it (the CLI prints it) ...
    with pytest.raises(SystemExit) as exited, worker_errors(Ranks(1, 2)):
        raise error  # ... the others exit 2 without a word
    assert exited.value.code == 2
    monkeypatch.setenv("ZMDEVICE_RANK_ERRORS", str(tmp_path))
    for rank in (1, 0):  # under launch: every rank leaves it to the launcher
        with pytest.raises(SystemExit), worker_errors(Ranks(rank, 2)):
            raise UserError(f"rank {rank} says so", hint=error.hint)
    said = first_rank_error(tmp_path)
    assert said.message == "rank 0 says so" and said.hint == error.hint
    assert capsys.readouterr().err == ""
    with worker_errors(Ranks()), pytest.raises(UserError):  # one process: untouched
        raise error


LAUNCHER = """
import sys
import zmdevice.training.distributed as distributed
distributed.affinity_cores = lambda: 2  # the launcher's check passes on a one-core test run
sys.argv = ["zmdevice", *sys.argv[1:]]
from zmdevice.cli import app
app()
"""


def test_a_worker_error_under_nproc_is_one_line_and_exit_2(image_data, tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text("threads = 1\nlabeled_batch_size = 3\n")  # 3 does not split over 2
    command = [sys.executable, "-c", LAUNCHER, "train", "--nproc", "2",
               "--labeled", str(image_data / "labeled"), "--unlabeled",
               str(image_data / "unlabeled"), "--pseudo-labels",
               str(image_data / "labels.parquet"), "--student", "tiny-cnn", "--device", "cpu",
               "--out", str(tmp_path / "run"), "--config", str(settings)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "error: labeled_batch_size = 3 does not split over 2 processes: set it to a multiple "
        "of 2 in --config"
    ], done.stderr[-3000:]


# ------------------------------------------------------------------ time budgets


def test_non_finite_and_absurd_budgets_are_refused_before_anything(image_data, tmp_path):
    from zmdevice.training.budget import check_time_budget
    from zmdevice.training.run import run_train

    out = tmp_path / "run"
    with pytest.raises(UserError, match="--time-budget 1e\\+09: .*at most 10080 \\(7 days\\)$"):
        run_train(image_config(image_data, out, time_budget=1e9))
    assert not out.exists()
    for minutes in (float("inf"), float("nan"), -1.0):
        with pytest.raises(UserError, match="at most 10080"):
            check_time_budget(minutes)
    check_time_budget(10080.0)


def test_a_refused_budget_with_overwrite_keeps_the_previous_run(image_data, tmp_path):
    from zmdevice.training.run import run_train

    out = tmp_path / "run"
    run_train(image_config(image_data, out, kd_steps=2, ssl_steps=2, stop_after=1, test=None))
    before = snapshot(out)
    assert (out / "checkpoints" / "last.json").is_file()
    with pytest.raises(UserError, match="leaves no time to train"):
        run_train(image_config(image_data, out, overwrite=True, time_budget=0.0001, test=None))
    assert snapshot(out) == before


# ------------------------------------------------------------------ class priors, few-shot


def test_huge_class_prior_shares_normalise_without_nan():
    classes = ClassList(["a", "b", "c"], {})
    shares = load_class_prior("a=1e308,b=1e308,c=5e307", classes)
    assert shares == pytest.approx([0.4, 0.4, 0.2])
    with pytest.raises(UserError, match="share of class 'b' is too small next to the largest"):
        load_class_prior("a=1e308,b=1e-308,c=1", classes)


def test_a_few_shot_set_of_one_class_is_refused():
    classes = ClassList(["a", "b", "c"], {})
    with pytest.raises(UserError, match="--few-shot f.csv holds examples of only class 'a'"):
        check_few_shot_classes(["a", "a", "a"], classes, "--few-shot f.csv")
    with pytest.raises(UserError, match="none of the classes"):
        check_few_shot_classes([], classes, "--few-shot f.csv")
    assert check_few_shot_classes(["b", "a", "b"], classes, "--few-shot f.csv") == ["c"]


def label_command(folder: Path, embed_dir: Path, *extra) -> list[str]:
    """`zmdevice label` on a 30-text table in ``folder`` with the tiny embedding teacher,
    writing to its default output (under ``runs/`` of the working folder)."""
    from helpers import TOPIC_NAMES, write_texts

    texts = write_texts(folder / "texts.csv", 30)
    return ["label", str(texts), "--classes", TOPIC_NAMES, "--teacher", f"text-embed:{embed_dir}",
            "--device", "cpu", "--workers", "0", "--batch-size", "4", *extra]  # fmt: skip


def test_a_one_class_few_shot_file_is_one_line_and_leaves_no_folder(
    tmp_path, embed_dir, monkeypatch
):
    from typer.testing import CliRunner

    from zmdevice.cli import app

    monkeypatch.chdir(tmp_path)
    few_shot = tmp_path / "one-class.csv"
    few_shot.write_text("id,text,label\na,game team,sports\nb,ball game,sports\n")
    args = label_command(tmp_path, embed_dir, "--few-shot", str(few_shot))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: --few-shot {few_shot} holds examples of only class 'sports' (2 example(s)); "
        "a few-shot set needs examples of at least 2 classes of 3, better of every class"
    ]
    assert snapshot(tmp_path) == before  # not even the runs/labels/ folder the lock needed


def test_labels_made_otherwise_get_their_own_default_file(tmp_path, embed_dir, monkeypatch):
    from typer.testing import CliRunner

    from zmdevice.cli import app

    monkeypatch.chdir(tmp_path)
    few_shot = tmp_path / "few.csv"
    few_shot.write_text(
        "id,text,label\na,game team,sports\nb,vote law,politics\nc,atom cell,science\n"
        "d,the match,sports\ne,a vote,politics\nf,cell atom,science\n"
    )

    def label(*extra) -> str:
        result = CliRunner().invoke(app, label_command(tmp_path, embed_dir, *extra, "--json"))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["out"]

    outs = {"zero-shot": label()}
    zero_shot = snapshot(tmp_path / "runs" / "labels")
    outs["refined"] = label("--refine")
    outs["few-shot refined"] = label("--few-shot", str(few_shot), "--refine")
    outs["few-shot only"] = label("--few-shot", str(few_shot), "--no-refine")
    assert outs == {
        "zero-shot": "runs/labels/texts-text-embed-m.parquet",
        "refined": "runs/labels/texts-text-embed-m-refined.parquet",
        "few-shot refined": "runs/labels/texts-text-embed-m-fewshot.parquet",
        "few-shot only": "runs/labels/texts-text-embed-m-fewshot-norefine.parquet",
    }
    # The later runs left the zero-shot file as it was.
    labels = snapshot(tmp_path / "runs" / "labels")
    assert labels["texts-text-embed-m.parquet"] == zero_shot["texts-text-embed-m.parquet"]


# ------------------------------------------------------------------ Ray addresses


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_closed_ray_address_is_one_line_within_seconds():
    from zmdevice.labeling import ray_engine as label_ray

    class NoRay:
        def init(self, **kwargs):
            raise AssertionError("ray.init was called")

    address = f"127.0.0.1:{closed_port()}"
    began = time.monotonic()
    with pytest.raises(UserError, match=f"--ray-address {address}: nothing answers"):
        label_ray._start(NoRay(), address)
    assert time.monotonic() - began < 5
    with pytest.raises(UserError, match="give HOST:PORT"):
        label_ray.check_ray_address("no-port-here")
    label_ray.check_ray_address("auto")  # Ray's own to resolve


# ------------------------------------------------------------------ full disks


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_nothing(
    image_data, tmp_path, monkeypatch
):
    import safetensors.torch

    from zmdevice.training.run import run_train

    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_no_space)
    out = tmp_path / "models" / "run"
    with pytest.raises(UserError, match="^disk full writing .*checkpoints/last-.*: free space or"):
        run_train(image_config(image_data, out, kd_steps=2, ssl_steps=2, test=None))
    assert not out.parent.exists()  # nor the models/ folder made for it


def test_a_full_disk_writing_the_settings_leaves_nothing_through_the_cli(
    image_data, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    import zmdevice.training.run
    from zmdevice.cli import app

    monkeypatch.setattr(zmdevice.training.run, "write_text_atomic", no_space)
    out = tmp_path / "run"
    settings = tmp_path / "settings.toml"
    settings.write_text("".join(f"{key} = {value}\n" for key, value in FAST.items()))
    args = ["train", "--labeled", str(image_data / "labeled"), "--unlabeled",
            str(image_data / "unlabeled"), "--pseudo-labels", str(image_data / "labels.parquet"),
            "--student", "tiny-cnn", "--device", "cpu", "--kd-steps", "2", "--ssl-steps", "2",
            "--out", str(out), "--config", str(settings)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: disk full writing {out}: free space or choose --out elsewhere"
    ]
    assert not out.exists()


def test_a_full_disk_in_a_resumed_run_keeps_its_earlier_work(image_data, tmp_path, monkeypatch):
    import safetensors.torch

    from zmdevice.training.run import run_train

    out = tmp_path / "run"
    run_train(image_config(image_data, out, kd_steps=2, ssl_steps=2, stop_after=1, test=None))
    before = snapshot(out / "checkpoints")
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_no_space)
    with pytest.raises(UserError, match="disk full writing"):
        run_train(image_config(image_data, out, kd_steps=2, ssl_steps=2, resume=True, test=None))
    assert snapshot(out / "checkpoints") == before
    assert (out / "metrics.jsonl").is_file() and (out / "train_config.toml").is_file()


def test_a_full_disk_during_export_leaves_no_tokenizer_or_model(tmp_path, monkeypatch):
    import onnx

    from zmdevice.config import ExportConfig
    from zmdevice.exporting.run import run_export
    from zmdevice.students import build_student, save_student

    model_dir = tmp_path / "student"
    save_student(build_student("tiny-distilbert", TEXT_CLASSES, seed=0), model_dir)
    monkeypatch.setattr(onnx, "save_model", no_space)
    out = tmp_path / "export" / "m.onnx"
    with pytest.raises(UserError, match="^disk full writing .*m.onnx: free space or choose --out"):
        run_export(ExportConfig(model_dir=model_dir, out=out))
    assert list(out.parent.iterdir()) == []  # no tokenizer, no model, no temporary folder
    monkeypatch.undo()
    summary = run_export(ExportConfig(model_dir=model_dir, out=out))
    assert sorted(path.name for path in out.parent.iterdir()) == [
        "m.README.md",
        "m.onnx",
        "m.tokenizer.json",
    ]
    assert json.loads(json.dumps(summary))["tokenizer"] == str(out.parent / "m.tokenizer.json")
