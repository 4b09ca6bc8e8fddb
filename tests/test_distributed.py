"""Training on several processes (torchrun, gloo on CPU) against one process.

Each run starts ``ddp_worker.py`` (or the CLI) in a subprocess with tiny students and a few
steps of zeromatch, so stage 1, stage 2 with AdaMatch and the KD head all run on 2 ranks.
Checked: the ranks keep identical parameters after every step; a 2-rank text run matches a
1-process run of the same global batches (dropout off on both sides, see ``ddp_worker``)
within ``TOLERANCE``; a stopped 2-rank run resumed on 2 ranks ends bit-identical to an
uninterrupted one; resuming on another number of processes is refused with one line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, image_config, read_jsonl, text_config, weights

from zmdevice.errors import UserError
from zmdevice.training.run import run_train

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
"""Largest weight difference allowed between 2 ranks and 1 process after 8 steps (measured:
2e-8). The two compute the same sums in other orders (half-batch matmuls, gradients then
averaged over ranks), which differ by float32 rounding (~1e-7 relative); AdamW moves a
weight by up to the learning rate per step, so a missing gradient sync or a wrongly scaled
loss shows as differences of ~1e-4, far above this bound."""
SMALL = dict(threads=1, kd_steps=4, ssl_steps=4, eval_every=2, log_every=1,
             kd_batch_size=8, labeled_batch_size=4, unlabeled_batch_size=8)  # fmt: skip
TEXT_PRECISION = "fp32"
"""Pinned for the comparison with one process: on a CPU with bf16 instructions ``auto``
trains the text student in bf16, whose rounding depends on how a batch is split (measured:
3.6e-3 after 8 steps), as large as the errors the comparison is there to catch."""


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_worker(config, dump: Path, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    dump.mkdir(parents=True, exist_ok=True)
    settings = dump / "settings.json"
    settings.write_text(json.dumps(
        {key: str(value) if isinstance(value, Path) else value
         for key, value in vars(config).items() if value is not None}))  # fmt: skip
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*launcher, str(WORKER), str(settings), str(dump), *flags]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 or "--resume" in flags, done.stderr[-3000:]
    return done


needs_two_cores = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="2 ranks need 2 usable cores (more are refused)"
)


def rank_records(dump: Path, nproc: int) -> list[dict]:
    return [json.loads((dump / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@needs_two_cores
def test_two_text_ranks_stay_identical_and_match_one_process(text_data, tmp_path):
    single = text_config(text_data, tmp_path / "one", precision=TEXT_PRECISION, **SMALL)
    double = text_config(text_data, tmp_path / "two", precision=TEXT_PRECISION, **SMALL)
    run_worker(single, tmp_path / "dump-one", 1, "--no-dropout")
    run_worker(double, tmp_path / "dump-two", 2, "--no-dropout")

    records = rank_records(tmp_path / "dump-two", 2)
    assert records[0] == records[1]
    assert records[0]["global_step"] == 8
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert sorted(one) == sorted(two)
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    assert worst < TOLERANCE
    # The logged losses are the global batch's (averaged over ranks), step by step.
    logs = [read_jsonl(out / "metrics.jsonl") for out in (tmp_path / "one", tmp_path / "two")]
    losses = [[record["loss"] for record in log if "loss" in record] for log in logs]
    assert len(losses[0]) == len(losses[1]) == 8
    assert any(record["stage"] == "ssl" and "kd" in record for record in logs[1])  # KD head
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    # Rank 0 alone wrote the run's files.
    assert (tmp_path / "two" / "report.md").is_file()


@needs_two_cores
def test_two_image_ranks_resume_exactly_and_refuse_another_count(image_data, tmp_path):
    full = image_config(image_data, tmp_path / "full", **SMALL, test=None)
    command = [sys.executable, "-m", "zmdevice", "train", "--nproc", "2",
               "--labeled", str(full.labeled), "--unlabeled", str(full.unlabeled),
               "--pseudo-labels", str(full.pseudo_labels), "--student", "tiny-cnn",
               "--device", "cpu", "--kd-steps", "4", "--ssl-steps", "4",
               "--out", str(full.out), "--config", str(write_settings(tmp_path))]  # fmt: skip
    done = subprocess.run(command, env=environment(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained tiny-cnn with zeromatch" in done.stdout

    stopped = image_config(image_data, tmp_path / "parts", **SMALL, stop_after=6, test=None)
    run_worker(stopped, tmp_path / "dump-a", 2)
    with pytest.raises(UserError, match="written by a run on 2 process"):
        run_train(image_config(image_data, tmp_path / "parts", **SMALL, test=None, resume=True))
    resumed = image_config(image_data, tmp_path / "parts", **SMALL, test=None, resume=True)
    run_worker(resumed, tmp_path / "dump-b", 2)

    records = rank_records(tmp_path / "dump-b", 2)
    assert records[0] == records[1] and records[0]["global_step"] == 8
    full_weights, resumed_weights = weights(full.out), weights(tmp_path / "parts")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def write_settings(folder: Path) -> Path:
    path = folder / "settings.toml"
    settings = {**FAST, **SMALL}
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()
                            if key not in ("kd_steps", "ssl_steps")))  # fmt: skip
    return path


def test_each_rank_takes_its_slice_of_every_view_group():
    from types import SimpleNamespace

    from zmdevice.training.distributed import Ranks
    from zmdevice.training.stages import AdaMatch, SSLStage

    plan = SSLStage(4, unsup=AdaMatch(), kd_head=True)
    data = SimpleNamespace(labeled_index=torch.arange(100, 106))
    labeled, pool = torch.tensor([0, 3, 5, 1]), torch.tensor([7, 2, 9, 4, 8, 6])
    # rows: labeled weak (4), pool weak (6), pool strong (6); the value is the row number
    rows = torch.arange(16)
    batch = {"labeled": labeled, "pool": pool, "inputs": {"pixel_values": rows}}
    parts = [Ranks(rank, 2).shard(plan, data, batch) for rank in (0, 1)]

    assert torch.equal(torch.cat([part["labeled"] for part in parts]), labeled)
    assert torch.equal(torch.cat([part["pool"] for part in parts]), pool)
    assert parts[0]["inputs"]["pixel_values"].tolist() == [0, 1, 4, 5, 6, 10, 11, 12]
    assert parts[1]["inputs"]["pixel_values"].tolist() == [2, 3, 7, 8, 9, 13, 14, 15]
    assert Ranks().shard(plan, data, batch) is batch


def test_batches_that_do_not_split_and_nested_launches_are_refused(monkeypatch):
    from zmdevice.config import TrainConfig
    from zmdevice.training.distributed import Ranks, torchrun_command
    from zmdevice.training.stages import plan_stages

    config = TrainConfig(labeled=Path("l.csv"), unlabeled=Path("u.csv"), labeled_batch_size=6,
                         unlabeled_batch_size=9, kd_batch_size=8)  # fmt: skip
    plans = plan_stages(config)
    Ranks(0, 2).check_config(plans[:1], config)  # kd_batch_size 8 splits
    with pytest.raises(UserError, match="unlabeled_batch_size = 9 does not split over 2"):
        Ranks(0, 2).check_config(plans, config)

    command = torchrun_command(2, ["train", "--nproc", "2", "--out", "m", "--nproc=2"])
    assert command[-5:] == ["-m", "zmdevice", "train", "--out", "m"]
    assert "--nproc-per-node=2" in command
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="already started by torchrun"):
        torchrun_command(2, ["train"])


def test_usable_cores_follows_omp_num_threads(monkeypatch):
    from zmdevice.training.distributed import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    every = usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert usable_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert usable_cores() == every
