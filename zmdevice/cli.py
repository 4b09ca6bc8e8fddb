"""The `zmdevice` command line: a thin typer layer over the stage functions.

Every command maps its flags onto a typed config (``zmdevice.config``) and calls one plain
function. The flags of the config's fields, with their defaults and help, are made from the
dataclass itself (``zmdevice.cli_options``), so each is written once, in the config. Heavy
imports (torch, transformers, open_clip) happen inside the stage functions so that
``zmdevice --help`` and ``zmdevice predict`` start fast. A ``UserError`` becomes a one-line
message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.main

from zmdevice.cli_options import config_options
from zmdevice.config import (
    DataOptions,
    ExportConfig,
    LabelConfig,
    TrainConfig,
    load_config,
    methods_help,
)
from zmdevice.curation.settings import CheckConfig, SuggestConfig
from zmdevice.demo import DemoConfig
from zmdevice.errors import UserError, missing_dependency, os_error

app = typer.Typer(
    name="zmdevice",
    help="ZeroMatch on small hardware: label with a foundation model, train a small student "
    "on CPU, export to ONNX, predict with onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors_exit_2(command):
    """Turn ``UserError``, a missing optional dependency and a failing file system
    (``OSError``) into one line on stderr and exit code 2.

    The message is rendered for the running command's flags, so a remedy never names a flag
    this command lacks; a message is kept to one line whatever its source.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        name = command.__name__
        try:
            return command(*args, **kwargs)
        except UserError as error:
            fail(error, name)
        except ModuleNotFoundError as error:
            fail(missing_dependency(error, f"zmdevice {name}"), name)
        except OSError as error:
            fail(os_error(error), name)

    return wrapper


def command(cls=None, **options):
    """``app.command`` whose ``UserError`` is one line (``user_errors_exit_2``) and, given a
    config class, whose options are its fields (``cli_options.config_options(cls, ...)``)."""

    def decorate(function):
        if cls is not None:
            function = config_options(cls, **options)(function)
        return app.command()(user_errors_exit_2(function))

    return decorate


def command_flags(name: str) -> set[str]:
    """The long flags of the command ``name``, as typer builds them."""
    command = typer.main.get_command(app).commands[name]
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def fail(error: UserError, command: str) -> None:
    """Print ``error`` as one line for ``command``'s flags and exit with code 2."""
    message = " ".join(error.render(command_flags(command)).split())
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2) from None


def emit_summary(summary: dict, as_json: bool) -> None:
    """Print the summary's one-screen ``lines``, or the whole ``summary`` with ``--json``."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        for line in summary.get("lines", []):
            typer.echo(line)


# The options that are not config fields, each declared once here; every other option is a
# field of a config dataclass, made by ``config_options`` (``zmdevice.cli_options``).
ConfigOption = Annotated[
    Path | None,
    typer.Option(help="TOML file with any of the command's settings; typed flags win over it."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
NprocOption = Annotated[
    int, typer.Option(help="Train on this many processes (one per GPU or CPU-core group).")
]
EVALUATE_OPTIONS = ("device", "text_column", "label_column")
"""The LabelConfig and DataOptions fields that ``evaluate`` takes as options of its own."""
STAGES = {
    LabelConfig: "zmdevice.labeling.run:run_label",
    TrainConfig: "zmdevice.training.run:run_train",
    ExportConfig: "zmdevice.exporting.run:run_export",
    SuggestConfig: "zmdevice.curation.suggest:run_suggest",
    CheckConfig: "zmdevice.curation.check:run_check",
}
"""The stage function each config is run by, imported only when it runs."""


def run_stage(cls, config_file: Path | None, flags: dict, as_json: bool) -> None:
    """Build ``cls`` from the ``--config`` file and the typed flags, then run its stage: the
    settings are checked before any heavy import."""
    settings = load_config(cls, config_file, flags)
    module, _, name = STAGES[cls].partition(":")
    emit_summary(getattr(importlib.import_module(module), name)(settings), as_json)


@command(LabelConfig, positional=("data",))
def label(config: ConfigOption = None, as_json: JsonOption = False, **flags) -> None:
    """Run a foundation model zero-shot once and write the pseudo-label file."""
    run_stage(LabelConfig, config, flags, as_json)


@command(TrainConfig, notes={"method": methods_help() + "."})
def train(
    config: ConfigOption = None, nproc: NprocOption = 1, as_json: JsonOption = False, **flags
) -> None:
    """Train a student: stage 1 distils the FM, stage 2 SSL with the auxiliary KD head.

    Every setting is a flag here and a key of the --config TOML file; train_config.toml in
    the output lists them all.
    """
    if nproc != 1:
        from zmdevice.training.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    run_stage(TrainConfig, config, flags, as_json)


@command(ExportConfig, positional=("model_dir",))
def export(config: ConfigOption = None, as_json: JsonOption = False, **flags) -> None:
    """Export a trained student to one self-contained ONNX file (main head only)."""
    run_stage(ExportConfig, config, flags, as_json)


@command(SuggestConfig, positional=("data",))
def suggest(config: ConfigOption = None, as_json: JsonOption = False, **flags) -> None:
    """Rank unlabeled samples to label next: a CSV to fill in (or Label Studio tasks).

    Without a student and with few labels, samples that cover the FM's feature space,
    balanced over its classes; later, where the FM, the few-shot adapter and the student
    are unsure or disagree, kept diverse. Classes no labeled example has yet are sought
    first (the FM's most confident sample of each where its labels of the labeled examples
    beat chance, else regions far from every label). The filled-in CSV is a --labeled table.
    """
    run_stage(SuggestConfig, config, flags, as_json)


@command(CheckConfig, positional=("labeled",))
def check(config: ConfigOption = None, as_json: JsonOption = False, **flags) -> None:
    """Rank labeled examples by how likely their label is wrong, and count pseudo-label
    suspects per class (cross-validated probe and nearest labeled neighbours on the FM's
    features, plus the student's)."""
    run_stage(CheckConfig, config, flags, as_json)


@command(DataOptions, only=("text_column",), every_value=True)
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx file.")],
    inputs: Annotated[
        list[str], typer.Argument(help="Image files/folders, text strings, or a table.")
    ],
    top_k: Annotated[int, typer.Option(help="Classes shown per input.")] = 1,
    as_json: JsonOption = False,
    **flags,
) -> None:
    """Classify inputs with an exported model through onnxruntime (no torch)."""
    from zmdevice.runtime import run_predict

    emit_summary(run_predict(model, inputs, top_k=top_k, **flags), as_json)


@command(LabelConfig, only=EVALUATE_OPTIONS, every_value=True)
def evaluate(
    model: Annotated[
        Path, typer.Argument(help="A trained student folder or an exported .onnx file.")
    ],
    data: Annotated[Path, typer.Option(help="Labeled test data.")],
    as_json: JsonOption = False,
    **flags,
) -> None:
    """Accuracy, macro-F1, per-class recall and confusion of a student on labeled data."""
    if model.suffix == ".onnx":
        from zmdevice.runtime import run_evaluate_onnx as run_evaluate
    else:
        from zmdevice.evaluate import run_evaluate_student as run_evaluate
    emit_summary(run_evaluate(model, data, **flags), as_json)


@command(DemoConfig)
def demo(as_json: JsonOption = False, **flags) -> None:
    """The whole workflow on the embedded default data: label, train, export, predict."""
    from zmdevice.demo import run_demo

    emit_summary(run_demo(DemoConfig(**flags)), as_json)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
