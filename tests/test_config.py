"""Config files and flags: a typed flag always wins, a flag left out never does; bad values
are one line naming the key, the file and what is expected.

Every option of `label`, `train` and `export` is checked through the real CLI; the stage
function is replaced by one that records the config it receives.
"""

from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.config import DEFAULT_STUDENTS, LabelConfig, TrainConfig, load_config
from zmdevice.errors import UserError

# option -> (value in the file, value typed on the command line). The typed value is the
# dataclass default where there is one, so a merge that only replaces non-defaults fails.
TRAIN = {
    "labeled": ("file.csv", "flag.csv"),
    "unlabeled": ("file-u.csv", "flag-u.csv"),
    "pseudo_labels": ("file.parquet", "flag.parquet"),
    "student": ("distilbert", "mobilenet_v3_small"),
    "out": ("file-out", "flag-out"),
    "device": ("cuda", "auto"),
    "method": ("kd", "zeromatch"),
    "kd_steps": (7, 0),
    "ssl_steps": (9, 0),
    "seed": (3, 0),
    "resume": (True, False),
    "overwrite": (True, False),
    "test": ("file-test.csv", "flag-test.csv"),
    "soft_labels": (True, False),
    "allow_partial": (True, False),
    "ssl_loss": ("fixmatch", "adamatch"),
    "alpha": ("constant", "ramp"),
    "log": ("mlflow", "none"),
}
LABEL = {
    "data": ("file.csv", "flag.csv"),
    "classes": ("x,y", "a,b"),
    "teacher": ("clip:x", "minilm"),
    "out": ("file.parquet", "flag.parquet"),
    "batch_size": (8, 64),
    "device": ("cuda", "auto"),
    "top_k": (2, 5),
    "gold": ("file-gold.csv", "flag-gold.csv"),
    "resume": (True, False),
    "shard": ("0/2", "1/2"),
    "templates": ("openai", "paper"),
    "text_column": ("sentence", "text"),
    "id_column": ("key", "id"),
    "label_column": ("y", "label"),
    "path_column": ("file", "path"),
    "skip_corrupt": (True, False),
    "workers": (3, 0),
    "combine": (True, False),
}
EXPORT = {
    "model_dir": ("file-model", "flag-model"),
    "out": ("file.onnx", "flag.onnx"),
    "quantize": ("int8", "int8"),
    "test": ("file-test.csv", "flag-test.csv"),
    "calibration": ("file-cal", "flag-cal"),
    "opset": (20, 18),
}
COMMANDS = {
    "train": (TRAIN, "zmdevice.training.run.run_train", {"labeled": "l.csv", "unlabeled": "u.csv"}),
    "label": (LABEL, "zmdevice.labeling.run.run_label", {"data": "d.csv", "classes": "a,b",
                                                  "teacher": "minilm"}),
    "export": (EXPORT, "zmdevice.exporting.run.run_export", {"model_dir": "m"}),
}  # fmt: skip
POSITIONAL = {"data", "model_dir"}


def flag_args(key: str, value) -> list[str]:
    if key in POSITIONAL:
        return [str(value)]
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else "--no-" + key.replace("_", "-")]
    return [name, str(value)]


def invoke(monkeypatch, command: str, args: list[str]):
    """Run the CLI; return (result, config the stage function received or None)."""
    seen = []
    monkeypatch.setattr(COMMANDS[command][1], lambda config: seen.append(config) or {})
    result = CliRunner().invoke(app, [command, *args])
    return result, (seen[0] if seen else None)


def value_of(config, key):
    options = getattr(config, "data_options", None)
    value = getattr(options, key) if not hasattr(config, key) else getattr(config, key)
    return str(value) if isinstance(value, Path) else value


CASES = [(command, key) for command, (table, _, _) in COMMANDS.items() for key in table]


@pytest.mark.parametrize(("command", "key"), CASES)
def test_a_typed_flag_wins_over_the_file_and_an_absent_one_never_does(
    tmp_path, monkeypatch, command, key
):
    table, _, required = COMMANDS[command]
    file_value, flag_value = table[key]
    config_file = tmp_path / "settings.toml"
    config_file.write_text(tomli_w.dumps({**required, key: file_value}))
    base = ["--config", str(config_file)]

    result, config = invoke(monkeypatch, command, base + flag_args(key, flag_value))
    assert result.exit_code == 0, result.output
    assert value_of(config, key) == flag_value

    result, config = invoke(monkeypatch, command, base)
    assert result.exit_code == 0, result.output
    assert value_of(config, key) == file_value


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('kd_batch_size = "big"', "kd_batch_size = 'big' must be an integer"),
        ("lr = -0.1", "lr must be > 0, got -0.1"),
        ("warmup = 1.5", "warmup must be in [0, 1), got 1.5"),
        ("sed = 3", "unknown key(s) sed"),
        ("soft_labels = 1", "soft_labels = 1 must be true or false"),
        ('method = "magic"', "method must be one of zeromatch, kd"),
        ("[extra]\nthreshold = 2.0", "threshold must be in [0, 1], got 2.0"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_key_and_file(tmp_path, line, named):
    config_file = tmp_path / "bad.toml"
    config_file.write_text(f'labeled = "l.csv"\nunlabeled = "u.csv"\n{line}\n')
    result = CliRunner().invoke(app, ["train", "--config", str(config_file)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.count("\n") == 0 and "Traceback" not in result.output
    assert str(config_file) in message and named in message


def test_a_bad_flag_value_names_the_flag_and_missing_required_settings_are_named(tmp_path):
    result = CliRunner().invoke(app, ["train", "--labeled", "l", "--unlabeled", "u",
                                      "--kd-steps", "-1"])  # fmt: skip
    assert result.exit_code == 2 and "--kd-steps: kd_steps must be >= 0" in result.output
    result = CliRunner().invoke(app, ["train", "--labeled", "l"])
    assert result.exit_code == 2 and "--unlabeled is required" in result.output
    result = CliRunner().invoke(app, ["export", "m", "--opset", "3"])
    assert result.exit_code == 2 and "--opset 3 is not supported" in result.output


def test_modality_defaults_fill_only_what_is_not_set():
    config = TrainConfig(labeled=Path("l"), unlabeled=Path("u"), lr=0.5)
    text = config.for_modality("text")
    assert text.lr == 0.5 and text.head_lr == 1e-3 and text.kd_batch_size == 32
    image = TrainConfig(labeled=Path("l"), unlabeled=Path("u"), method="fixmatch")
    # A method without stage 1 spends both stages' default budget in its one stage.
    assert image.for_modality("image").ssl_steps == 1000
    # A student preset's [train] table comes before its modality's defaults, after the user.
    preset = {"lr": 5e-4, "kd_steps": 250, "ssl_steps": 250}
    tuned = TrainConfig(labeled=Path("l"), unlabeled=Path("u"), kd_steps=10)
    tuned = tuned.for_modality("image", preset)
    assert (tuned.lr, tuned.kd_steps, tuned.ssl_steps, tuned.head_lr) == (5e-4, 10, 250, 2e-3)
    with pytest.raises(UserError, match=r"its \[train\] table sets threshold: it may set only"):
        config.for_modality("image", {"threshold": 0.5})


def test_default_image_student_is_the_pretrained_preset_with_its_training_defaults():
    from zmdevice.catalog import require_entry

    entry = require_entry(DEFAULT_STUDENTS["image"], "student", "--student")
    assert DEFAULT_STUDENTS["image"] == "efficientnet_lite0" and entry["weights"] == "imagenet"
    config = TrainConfig(labeled=Path("l"), unlabeled=Path("u")).for_modality(
        "image", entry["train"]
    )
    assert (config.kd_steps, config.ssl_steps, config.lr, config.head_lr) == (250, 250, 5e-4, 2e-3)


def test_label_config_file_feeds_the_data_options(tmp_path):
    config_file = tmp_path / "label.toml"
    config_file.write_text('data = "d.csv"\nclasses = "a,b"\nteacher = "minilm"\n'
                           'text_column = "sentence"\n')  # fmt: skip
    config = load_config(LabelConfig, config_file, {"skip_corrupt": True})
    assert config.data_options.text_column == "sentence" and config.data_options.skip_corrupt


def test_log_choices_are_none_and_the_trackers():
    """config (ground) cannot import trackers (middle): its copy of the names is pinned here."""
    from zmdevice import trackers
    from zmdevice.config import LOG_TRACKERS

    assert ("none", *trackers.TRACKERS) == LOG_TRACKERS
    with pytest.raises(UserError, match="log must be one of none, tensorboard, mlflow"):
        TrainConfig(labeled="l.csv", unlabeled="u.csv", log="wandb")
