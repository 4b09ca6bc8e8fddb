"""One config, written once: every option of `label`, `train`, `export` and `demo` is a field
of its dataclass (flag from the name, default from the field, help from the field's
docstring), and the Python API's keyword defaults are the same objects' defaults."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from zmdevice import api
from zmdevice.cli import app
from zmdevice.cli_options import command_fields, field_docs
from zmdevice.config import (
    DEFAULT_STUDENTS,
    MODALITY_DEFAULTS,
    ExportConfig,
    LabelConfig,
    TrainConfig,
)
from zmdevice.demo import DemoConfig

COMMANDS = {"label": LabelConfig, "train": TrainConfig, "export": ExportConfig, "demo": DemoConfig}
NOT_FIELDS = {"label": {"config", "as_json"}, "train": {"config", "as_json", "nproc"},
              "export": {"config", "as_json"}, "demo": {"as_json"}}  # fmt: skip
"""The options of each command that are not config fields (declared once, in cli.py)."""


def options(command: str) -> dict:
    group = typer.main.get_command(app)
    return {param.name: param for param in group.commands[command].params}


def plain(text: str) -> list[str]:
    """Words of a docstring or a help line, with code quotes and flag dashes dropped."""
    text = re.sub(r"``([^`]+)``", r"\1", text).replace("--", "").replace("-", "_")
    return text.split()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_one_option_with_its_default_and_docstring(command):
    found = options(command)
    fields = command_fields(COMMANDS[command])
    assert set(found) - {item.name for _, item in fields} - {"help"} == NOT_FIELDS[command]
    for owner, item in fields:
        param, doc = found[item.name], field_docs(owner).get(item.name)
        assert doc, f"{owner.__name__}.{item.name} has no docstring"
        assert plain(param.help)[: len(plain(doc))] == plain(doc), item.name
        if param.param_type_name == "argument":
            continue
        assert "--" + item.name.replace("_", "-") in param.opts
        if item.default is dataclasses.MISSING:
            assert param.default is None and not param.required  # may come from --config
        else:
            assert param.default == item.default, item.name


def test_train_help_shows_the_defaults_the_data_settles():
    found = options("train")
    for key in ("kd_steps", "ssl_steps", "lr"):
        shown = found[key].show_default
        assert all(str(MODALITY_DEFAULTS[m][key]) in shown for m in ("image", "text")), shown
    assert all(name in found["student"].show_default for name in DEFAULT_STUDENTS.values())
    assert found["seed"].default == TrainConfig.seed and found["seed"].show_default
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--kd-steps" in result.output
    assert "else 500 for image, 150 for text" in " ".join(result.output.split())


def test_an_untyped_flag_reaches_the_config_as_not_typed(monkeypatch):
    seen = []
    monkeypatch.setattr("zmdevice.cli.load_config", lambda cls, file, flags: seen.append(flags))
    monkeypatch.setattr("zmdevice.training.run.run_train", lambda config: {})
    CliRunner().invoke(app, ["train", "--labeled", "l", "--no-resume", "--seed", "0"])
    assert seen == [{"labeled": Path("l"), "resume": False, "seed": 0}]


def keyword_defaults(function) -> dict:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


@pytest.mark.parametrize(
    ("function", "cls"),
    [(api.label, LabelConfig), (api.train, TrainConfig), (api.export, ExportConfig)],
)
def test_api_keyword_defaults_are_the_config_defaults(function, cls):
    fields = {item.name: item for _, item in command_fields(cls)}
    shared = {name: value for name, value in keyword_defaults(function).items() if name in fields}
    assert shared, function.__name__
    assert shared == {name: fields[name].default for name in shared}


def test_the_estimators_defaults_are_the_config_defaults():
    sklearn = pytest.importorskip("zmdevice.sklearn")
    fields = {item.name: item.default for item in dataclasses.fields(TrainConfig)}
    defaults = keyword_defaults(sklearn.ZeroMatchClassifier.__init__)
    shared = {name: value for name, value in defaults.items() if name in fields}
    assert {"method", "seed", "device", "kd_steps"} <= set(shared)
    assert shared == {name: fields[name] for name in shared}
