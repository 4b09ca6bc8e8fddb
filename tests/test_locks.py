"""One run at a time on an output: a run folder (train --out) and a labeling output are
claimed with a lock file; a second run is refused naming the first, a dead run's lock is
taken over, and the ranks of one distributed launch do not lock each other out."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_texts

from zmdevice.errors import UserError, claim

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from zmdevice.errors import claim
with claim(sys.argv[1], "the test's output"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """Start a process holding a lock file; yields ``hold(lock) -> pid``."""
    started = []

    def hold(lock: Path) -> int:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process.pid

    yield hold
    for process in started:
        process.stdin.close()  # the holder leaves its with-block and removes the lock
        process.wait(timeout=30)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(lock: Path, **owner) -> None:
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **owner}))


def test_a_live_holder_refuses_the_second_claim_naming_its_pid_host_and_start(tmp_path, holder):
    lock = tmp_path / "x.lock"
    pid = holder(lock)
    busy = f"in use by another zmdevice run \\(pid {pid} on host"
    with pytest.raises(UserError, match=busy), claim(lock, "--out x"):
        pass
    assert json.loads(lock.read_text())["pid"] == pid  # the holder's lock is untouched


def test_a_dead_runs_lock_is_taken_over_with_a_note_and_released_after(tmp_path, capsys):
    lock = tmp_path / "x.lock"
    pid = dead_pid()
    write_lock(lock, pid=pid)
    with claim(lock, "--out x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    assert (
        f"taking over the lock of a zmdevice run that is gone (pid {pid}" in capsys.readouterr().err
    )


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path):
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("needs /proc to tell a reused pid")
    lock = tmp_path / "x.lock"
    # This process's pid, but a process that started at another time: the owner is gone.
    write_lock(lock, pid=os.getpid(), process_start="another-boot:1")
    with claim(lock, "--out x"):
        assert json.loads(lock.read_text())["process_start"] != "another-boot:1"


def test_another_hosts_lock_is_refused_naming_the_file_to_delete(tmp_path):
    lock = tmp_path / "x.lock"
    write_lock(lock, pid=dead_pid(), host="elsewhere.example")
    refused = f"host elsewhere.example.*delete {lock}"
    with pytest.raises(UserError, match=refused), claim(lock, "--out x"):
        pass
    assert lock.exists()


def test_the_lock_is_released_on_an_error(tmp_path):
    lock = tmp_path / "x.lock"
    with pytest.raises(RuntimeError), claim(lock, "--out x"):
        raise RuntimeError("the run failed")
    assert not lock.exists()
    with claim(lock, "--out x"):  # and can be claimed again
        assert lock.exists()


def test_a_second_train_into_a_busy_folder_is_refused_and_writes_nothing(
    image_data, tmp_path, holder
):
    from helpers import image_config

    from zmdevice.training.run import LOCK, run_train

    out = tmp_path / "run"
    out.mkdir()
    pid = holder(out / LOCK)
    with pytest.raises(UserError, match=f"--out {out} is in use .*pid {pid}"):
        run_train(image_config(image_data, out, kd_steps=2, ssl_steps=2, test=None))
    assert sorted(path.name for path in out.iterdir()) == [LOCK]


def test_only_rank_zero_claims_the_run_folder(tmp_path, holder):
    from zmdevice.training.distributed import Ranks
    from zmdevice.training.run import LOCK, claim_run

    out = tmp_path / "run"
    out.mkdir()
    pid = holder(out / LOCK)
    with claim_run(out, Ranks(1, 2)):  # another rank of the launch that holds it
        pass
    with pytest.raises(UserError, match=f"pid {pid}"), claim_run(out, Ranks(0, 2)):
        pass
    assert json.loads((out / LOCK).read_text())["pid"] == pid


def test_a_second_label_on_the_same_output_is_refused_naming_the_first(tmp_path, embed_dir, holder):
    from helpers import TOPIC_NAMES

    from zmdevice.config import LabelConfig
    from zmdevice.labeling.parts import lock_path
    from zmdevice.labeling.run import run_label

    out = tmp_path / "out.parquet"
    parts = out.with_name(f".{out.name}.parts")
    pid = holder(lock_path(parts))
    config = LabelConfig(
        data=write_texts(tmp_path / "texts.csv", 12), classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed_dir}", out=out, batch_size=4, device="cpu", workers=0,
        resume=True,
    )  # fmt: skip
    with pytest.raises(UserError, match=f"--out {out} is in use .*pid {pid}"):
        run_label(config)
    assert not out.exists() and not parts.exists()
