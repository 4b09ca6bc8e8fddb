"""One rule for the student, on the command line and in Python: when none is named it
follows the labeled data's modality (``config.DEFAULT_STUDENTS``); a named student of the
other modality is one line and exit 2, before anything is built."""

from pathlib import Path

import pytest
from helpers import FAST
from typer.testing import CliRunner

import zmdevice
from zmdevice.cli import app
from zmdevice.config import DEFAULT_STUDENTS, TrainConfig, resolve_student

TINY = {"text": "tiny-distilbert", "image": "tiny-cnn"}


def data_args(root: Path, modality: str) -> list[str]:
    suffix = ".csv" if modality == "text" else ""
    labeled, unlabeled = f"labeled{suffix}", f"unlabeled{suffix}"
    return ["--labeled", str(root / labeled), "--unlabeled", str(root / unlabeled),
            "--pseudo-labels", str(root / "labels.parquet")]  # fmt: skip


def fast_config(folder: Path) -> Path:
    settings = folder / "fast.toml"
    settings.write_text("".join(f"{key} = {value}\n" for key, value in FAST.items()))
    return settings


@pytest.mark.parametrize("modality", ["text", "image"])
def test_the_default_student_is_the_modalitys(text_data, image_data, modality):
    root = text_data if modality == "text" else image_data
    labeled = root / ("labeled.csv" if modality == "text" else "labeled")
    config = resolve_student(TrainConfig(labeled=labeled, unlabeled=labeled))
    assert config.student == DEFAULT_STUDENTS[modality]
    assert DEFAULT_STUDENTS == {"image": "efficientnet_lite0", "text": "distilbert"}
    named = TrainConfig(labeled=labeled, unlabeled=labeled, student=TINY[modality])
    assert resolve_student(named).student == TINY[modality]


def test_cli_train_on_text_without_student_trains_the_text_default(
    text_data, tmp_path, monkeypatch
):
    # The real text default downloads DistilBERT; the rule is the same with a tiny one.
    monkeypatch.setitem(DEFAULT_STUDENTS, "text", "tiny-distilbert")
    monkeypatch.setitem(DEFAULT_STUDENTS, "image", "tiny-cnn")
    out = tmp_path / "cli"
    settings = fast_config(tmp_path)
    args = ["train", *data_args(text_data, "text"), "--out", str(out), "--device", "cpu",
            "--kd-steps", "2", "--ssl-steps", "2", "--config", str(settings)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert 'student = "tiny-distilbert"' in (out / "train_config.toml").read_text()

    student = zmdevice.train(
        text_data / "labeled.csv", text_data / "unlabeled.csv", text_data / "labels.parquet",
        device="cpu", out=tmp_path / "api", kd_steps=2, ssl_steps=2, progress=False, **FAST,
    )  # fmt: skip
    assert student.summary["student"] == "tiny-distilbert" and student.modality == "text"


@pytest.mark.parametrize(
    ("modality", "student", "named"),
    [
        ("text", "tiny-cnn", "--student tiny-cnn is an image model but --labeled"),
        ("text", "efficientnet_lite0:", "holds text data: use a text student (distilbert"),
        ("image", "tiny-distilbert", "--student tiny-distilbert is a text model"),
    ],
)
def test_a_student_of_the_other_modality_is_one_line_and_exit_2(
    text_data, image_data, tmp_path, modality, student, named
):
    root = text_data if modality == "text" else image_data
    out = tmp_path / "out"
    args = ["train", *data_args(root, modality), "--student", student, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message and named in message
    assert not out.exists()  # refused before the run claimed its folder
