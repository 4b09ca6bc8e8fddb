"""Checkpoints and run folders through the CLI: unsafe, foreign, damaged or contradicting
state is refused with one line (exit 2), and nothing is run, written or changed.

The runs are tiny (tiny-cnn, a few steps, stopped early with ``stop_after`` so they write a
checkpoint and no report).
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers import snapshot
from typer.testing import CliRunner

from zmdevice.cli import app

CLASSES = ["red", "green", "blue"]
SETTINGS = (
    "threads = 1\nkd_batch_size = 8\nlabeled_batch_size = 3\nunlabeled_batch_size = 8\n"
    "eval_batch_size = 16\neval_every = 2\nlog_every = 1\nbn_recalibration_batches = 1\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    from zmdevice.data import open_dataset
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(30):
        pixels = rng.integers(0, 80, (20, 20, 3)).astype(np.uint8)
        pixels[..., i % 3] += 150
        folders = [root / "unlabeled"] + ([root / "labeled" / CLASSES[i % 3]] if i < 6 else [])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    unlabeled = open_dataset(root / "unlabeled")
    probs = np.full((30, 3), 0.1, dtype=np.float32)
    probs[np.arange(30), np.arange(30) % 3] = 0.8
    metadata = build_metadata(classes=CLASSES, teacher={"spec": "fake"},
                              data={"fingerprint": unlabeled.fingerprint()}, top_k=3)  # fmt: skip
    with PseudoLabelWriter(root / "labels.parquet", metadata) as writer:
        writer.write_probs(list(unlabeled.ids), probs / probs.sum(axis=1, keepdims=True))
    (root / "settings.toml").write_text(SETTINGS)
    return root


def train(data, out, *extra, settings=None):
    args = ["train", "--labeled", str(data / "labeled"), "--unlabeled", str(data / "unlabeled"),
            "--pseudo-labels", str(data / "labels.parquet"), "--student", "tiny-cnn",
            "--device", "cpu", "--kd-steps", "3", "--ssl-steps", "3", "--out", str(out),
            "--config", str(settings or data / "settings.toml"), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def stopped_run(data, out):
    """A run stopped after 2 steps: a checkpoint, metrics.jsonl and train_config.toml."""
    settings = out.parent / f"{out.name}-stop.toml"
    settings.write_text(SETTINGS + "stop_after = 2\n")
    result = train(data, out, settings=settings)
    assert result.exit_code == 0, result.output
    return out


def assert_refused(result, folder, before, *named):
    """Exit 2, at most two stderr lines, no traceback, names given, folder unchanged."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.stderr
    for name in named:
        assert str(name) in result.stderr, (name, result.stderr)
    assert snapshot(folder) == before


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


def test_an_old_pickle_checkpoint_is_never_loaded(data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    (out / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"model": Exploit(marker)}))
    before = snapshot(out)
    result = train(data, out, "--resume")
    assert_refused(result, out, before, out / "checkpoints" / "last.pt", "--overwrite")
    assert not marker.exists()


def test_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(data, tmp_path):
    out = stopped_run(data, tmp_path / "run")
    before = snapshot(out)
    result = train(data, out, "--seed", "1")
    assert_refused(result, out, before, out, "--resume", "--overwrite", "--out")

    # --overwrite deletes the old run only once the new one could be set up.
    missing = tmp_path / "missing"
    settings = tmp_path / "bad-labeled.toml"
    settings.write_text(SETTINGS)
    result = CliRunner().invoke(app, ["train", "--labeled", str(missing), "--unlabeled",
        str(data / "unlabeled"), "--student", "tiny-cnn", "--method", "supervised",
        "--out", str(out), "--overwrite", "--config", str(settings)])  # fmt: skip
    assert_refused(result, out, before, missing)

    (out / "checkpoints" / "last.pt").write_bytes(b"an old run's checkpoint")
    result = train(data, out, "--seed", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoints" / "last.pt").exists()  # the old run's files are gone
    assert json.loads((out / "checkpoints" / "last.json").read_text())["settings"]["seed"] == 1


def test_resume_refuses_settings_that_contradict_the_checkpoint(data, tmp_path):
    out = stopped_run(data, tmp_path / "run")
    before = snapshot(out)
    other = tmp_path / "other.toml"
    other.write_text(SETTINGS.replace("kd_batch_size = 8", "kd_batch_size = 4"))
    result = train(data, out, "--resume", "--seed", "5", "--method", "kd", settings=other)
    assert_refused(result, out, before, "seed 5 (checkpoint 0)", "kd_batch_size 4 (checkpoint 8)",
                   "method 'kd' (checkpoint 'zeromatch')")  # fmt: skip

    fewer = tmp_path / "labeled"
    shutil.copytree(data / "labeled", fewer)
    next(fewer.rglob("*.png")).unlink()  # other labeled data, same settings
    result = CliRunner().invoke(app, ["train", "--labeled", str(fewer),
        "--unlabeled", str(data / "unlabeled"), "--pseudo-labels", str(data / "labels.parquet"),
        "--student", "tiny-cnn", "--device", "cpu", "--kd-steps", "3", "--ssl-steps", "3",
        "--out", str(out), "--config", str(data / "settings.toml"), "--resume"])  # fmt: skip
    assert_refused(result, out, before, "labeled data (other content")


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "manifest-garbage",
                                    "other-student"])  # fmt: skip
def test_damaged_or_foreign_checkpoints_are_one_line(data, tmp_path, damage):
    out = stopped_run(data, tmp_path / "run")
    folder = out / "checkpoints"
    manifest = json.loads((folder / "last.json").read_text())
    tensors = folder / manifest["tensors"]
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "random-bytes":
        tensors.write_bytes(np.random.default_rng(0).bytes(tensors.stat().st_size))
    elif damage == "manifest-garbage":
        (folder / "last.json").write_bytes(np.random.default_rng(1).bytes(300))
    else:
        # The tensors of another student, with a manifest that claims this run's settings.
        from safetensors.torch import load_file, save_file

        from zmdevice.students import build_student

        state = load_file(str(tensors))
        other = build_student("tiny-distilbert", CLASSES).state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("state/model/")}
        state.update({f"state/model/{k}": v.contiguous() for k, v in other.items()})
        save_file(state, str(tensors))
        from zmdevice.training.checkpoint import file_sha256

        manifest["sha256"] = file_sha256(tensors)
        (folder / "last.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    result = train(data, out, "--resume")
    assert_refused(result, out, before, folder, "--overwrite")


def test_a_torn_last_metrics_line_is_dropped_on_resume(data, tmp_path):
    out = stopped_run(data, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"stage": "kd", "stage_index": 0, "st')
    settings = tmp_path / "no-report.toml"
    settings.write_text(SETTINGS + "stop_after = 4\n")
    result = train(data, out, "--resume", settings=settings)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_out_of_memory_names_the_batch_sizes_and_leaves_nothing(data, tmp_path, monkeypatch):
    from zmdevice.training.stages import StepModel

    def no_memory(self, inputs, kd_rows=0):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StepModel, "forward", no_memory)
    out = tmp_path / "run"
    result = train(data, out)
    assert_refused(result, tmp_path / "run", {}, "out of memory", "kd_batch_size = 8",
                   "eval_batch_size", "--config")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
