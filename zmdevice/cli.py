"""The `zmdevice` command line: a thin typer layer over the stage functions.

Every command maps its flags onto a typed config (``zmdevice.config``) and calls one plain
function; heavy imports (torch, transformers, open_clip) happen inside those functions so
that ``zmdevice --help`` and ``zmdevice predict`` start fast. A ``UserError`` becomes a
one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.main

from zmdevice.config import (
    DEFAULT_STUDENTS,
    DEFAULT_TEACHERS,
    DataOptions,
    ExportConfig,
    LabelConfig,
    TrainConfig,
    methods_help,
)
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


def command_flags(name: str) -> set[str]:
    """The long flags of the command ``name``, as typer builds them."""
    command = typer.main.get_command(app).commands[name]
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def fail(error: UserError, command: str) -> None:
    """Print ``error`` as one line for ``command``'s flags and exit with code 2."""
    message = " ".join(error.render(command_flags(command)).split())
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2) from None


def emit_summary(summary: dict, as_json: bool, lines: list[str]) -> None:
    """Print a one-screen summary, or the machine-readable ``summary`` with ``--json``."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


DeviceOption = Annotated[
    str | None, typer.Option(help=f"auto, cpu, cuda, cuda:N or mps (default {TrainConfig.device}).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        help="auto, fp32, bf16 or fp16: the dtype the model computes in (default auto: what "
        "was measured fastest for this device and model; see zmdevice/precision.py)."
    ),
]


ConfigOption = Annotated[
    Path | None,
    typer.Option(help="TOML file with any of the command's settings; typed flags win over it."),
]


def typed_flags(local_values: dict, skip=("config", "as_json")) -> dict:
    """The command's flags (None = not typed; ``config.load_config`` ignores those)."""
    return {key: value for key, value in local_values.items() if key not in skip}


def by_modality(defaults: dict[str, str]) -> str:
    """A modality -> name table in help text: 'by the labeled data, X for text, Y for images'."""
    return "by the labeled data, " + ", ".join(f"{n} for {kind}" for kind, n in defaults.items())


@app.command()
@user_errors_exit_2
def label(
    data: Annotated[
        Path | None, typer.Argument(help="Text table (CSV/JSONL/Parquet) or image folder/table.")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="Comma list, one-per-line file, or TOML/JSON.")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Catalog name (minilm, efficientnet-lite0) or kind:spec.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output file (default labels/NAME-TEACHER.parquet).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Teacher batch size (default {LabelConfig.batch_size}).")
    ] = None,
    device: DeviceOption = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="Most probabilities kept per sample (default: all classes up to 1024)."),
    ] = None,
    gold: Annotated[
        Path | None, typer.Option(help="Labeled data: report the teacher's accuracy on it.")
    ] = None,
    resume: Annotated[bool | None, typer.Option(help="Continue an interrupted run.")] = None,
    shard: Annotated[str | None, typer.Option(help="Label only slice I of N, as I/N.")] = None,
    templates: Annotated[
        str | None,
        typer.Option(help="CLIP prompt templates: 'paper' (default), 'openai', or a file."),
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option(help=f"Text column of a table (default {DataOptions.text_column})."),
    ] = None,
    id_column: Annotated[
        str | None, typer.Option(help=f"Id column of a table (default {DataOptions.id_column}).")
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(help=f"Label column of a table (default {DataOptions.label_column})."),
    ] = None,
    path_column: Annotated[
        str | None,
        typer.Option(help=f"Path column of an image table (default {DataOptions.path_column})."),
    ] = None,
    skip_corrupt: Annotated[
        bool | None, typer.Option(help="Skip and count unreadable images instead of failing.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data-loading worker processes (default: 0 for text; cores-1, at most 4, for images)."
        ),
    ] = None,
    combine: Annotated[
        bool | None,
        typer.Option(help="Join the shard files NAME.shard-I-of-N.parquet into --out."),
    ] = None,
    few_shot: Annotated[
        Path | None,
        typer.Option(
            help="Your labeled examples: write the labels that cross-validation on them "
            "scores best (refined over the data's neighbour graph, with or without the FM's "
            "prior; text-embed and imagenet teachers)."
        ),
    ] = None,
    refine: Annotated[
        bool | None,
        typer.Option(
            help="--refine: refined labels (also without --few-shot: the FM's own labels "
            "spread); --no-refine: with --few-shot, the few-shot labels (a probe on the FM's "
            "features times its zero-shot probabilities), never refined."
        ),
    ] = None,
    class_prior: Annotated[
        str | None,
        typer.Option(
            help="With refined labels: the class shares you know the data has, 'balanced', "
            "'cat=3,dog=1' or a .json file; the refined labels are rebalanced to them "
            "(default: keep the FM's shares)."
        ),
    ] = None,
    precision: PrecisionOption = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="auto, torch, onnx or onnx-int8: run the teacher in PyTorch or as an ONNX "
            "export in onnxruntime (default auto: onnx on a CPU for sentence encoders and "
            "ImageNet classifiers; onnx-int8, for sentence encoders, is faster but changes "
            "some labels)."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="local (this machine) or ray (a Ray cluster; needs the ray extra)."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: start a local one).")
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="Ray teacher workers (each loads the teacher; default 1).")
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(help="GPUs per Ray teacher worker (default 0: the teacher runs on CPUs)."),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a foundation model zero-shot once and write the pseudo-label file."""
    flags = typed_flags(locals())  # first: only the parameters are local yet
    from zmdevice.config import load_config

    label_config = load_config(LabelConfig, config, flags)
    from zmdevice.labeling.run import run_label

    summary = run_label(label_config)
    emit_summary(summary, as_json, summary.get("lines", []))


def method_help() -> str:
    return f"Training method (default {TrainConfig.method}). {methods_help()}."


@app.command()
@user_errors_exit_2
def train(
    labeled: Annotated[
        Path | None,
        typer.Option(help="Labeled data (table with a label column, or class folders)."),
    ] = None,
    unlabeled: Annotated[Path | None, typer.Option(help="Unlabeled training data.")] = None,
    pseudo_labels: Annotated[
        Path | None,
        typer.Option(
            help="Pseudo-label file from `zmdevice label` (default: made first from "
            "--unlabeled with --teacher and the --labeled examples, into --out)."
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="The FM that makes the pseudo-labels when --pseudo-labels is not given "
            f"(default: {by_modality(DEFAULT_TEACHERS)})."
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="efficientnet_lite0, mobilenet_v3_small, mobilenet_v3_large, distilbert, or a "
            f"tiny preset (default: {by_modality(DEFAULT_STUDENTS)})."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default models/NAME).")] = None,
    device: DeviceOption = None,
    method: Annotated[str | None, typer.Option(help=method_help())] = None,
    kd_steps: Annotated[int | None, typer.Option(help="Stage-1 (distillation) steps.")] = None,
    ssl_steps: Annotated[int | None, typer.Option(help="Stage-2 (SSL) steps.")] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            help="Minutes for the whole run: steps planned from measured step times "
            "(split as kd_steps:ssl_steps), stops on time."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Random seed (default {TrainConfig.seed}).")
    ] = None,
    config: ConfigOption = None,
    resume: Annotated[
        bool | None, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = None,
    overwrite: Annotated[
        bool | None, typer.Option(help="Delete a previous run's files in --out first.")
    ] = None,
    test: Annotated[
        Path | None, typer.Option(help="Labeled test data for periodic evaluation.")
    ] = None,
    soft_labels: Annotated[
        bool | None, typer.Option(help="Distil the FM's probabilities (KL) instead of hard labels.")
    ] = None,
    allow_partial: Annotated[
        bool | None, typer.Option(help="Train on the ids the pseudo-label file covers.")
    ] = None,
    ssl_loss: Annotated[
        str | None,
        typer.Option(
            help=f"L_u of zeromatch: adamatch or fixmatch (default {TrainConfig.ssl_loss})."
        ),
    ] = None,
    alpha: Annotated[
        str | None,
        typer.Option(
            help=f"KD weight alpha_t: ramp (0 -> 1) or constant (default {TrainConfig.alpha})."
        ),
    ] = None,
    precision: PrecisionOption = None,
    nproc: Annotated[
        int,
        typer.Option(help="Train on this many processes (one per GPU or CPU-core group)."),
    ] = 1,
    as_json: JsonOption = False,
) -> None:
    """Train a student: stage 1 distils the FM, stage 2 SSL with the auxiliary KD head.

    Further settings (batch sizes, learning rates, threshold, checkpoint interval, ...)
    go in the --config TOML file; train_config.toml in the output lists them all.
    """
    flags = typed_flags(locals(), skip=("config", "as_json", "nproc"))  # first: only the
    # parameters are local yet
    if nproc != 1:
        from zmdevice.training.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    from zmdevice.config import load_config

    train_config = load_config(TrainConfig, config, flags)
    from zmdevice.training.run import run_train

    summary = run_train(train_config)
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def export(
    model_dir: Annotated[
        Path | None, typer.Argument(help="A trained student folder (models/NAME).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output file (default export/NAME.onnx).")
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: also write a quantized model.")
    ] = None,
    test: Annotated[
        Path | None, typer.Option(help="Labeled test data: compare int8 with fp32 accuracy.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Images for static int8 calibration (default: the training data)."),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help=f"ONNX opset (default {ExportConfig.opset}).")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            help="ort: also write NAME.ort (ONNX Runtime mobile format) and the operator "
            "config of a minimal onnxruntime build (default onnx)."
        ),
    ] = None,
    card_license: Annotated[
        str | None,
        typer.Option(
            help="Model card license, a Hugging Face id such as apache-2.0 or mit (default: the student preset's, for its own weights)."
        ),
    ] = None,
    card_language: Annotated[
        list[str] | None,
        typer.Option(
            help="Model card language code, e.g. en; repeat for more (default: the preset's or the teacher's)."
        ),
    ] = None,
    card_dataset: Annotated[
        list[str] | None,
        typer.Option(help="A data set the model card names (Hugging Face id); repeat for more."),
    ] = None,
    card_intended_use: Annotated[
        str | None, typer.Option(help="The model card's intended use, in your words.")
    ] = None,
    hub_folder: Annotated[
        Path | None,
        typer.Option(
            help="Also write a folder for huggingface_hub.upload_folder: README.md (the card), the ONNX file(s), the tokenizer, config.json with the class names."
        ),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a trained student to one self-contained ONNX file (main head only)."""
    flags = typed_flags(locals())  # first: only the parameters are local yet
    for key in ("card_language", "card_dataset"):  # a repeatable flag left out is []
        flags[key] = flags[key] or None
    from zmdevice.config import load_config

    export_config = load_config(ExportConfig, config, flags)
    from zmdevice.exporting.run import run_export

    summary = run_export(export_config)
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx file.")],
    inputs: Annotated[
        list[str], typer.Argument(help="Image files/folders, text strings, or a table.")
    ],
    top_k: Annotated[int, typer.Option(help="Classes shown per input.")] = 1,
    text_column: Annotated[str, typer.Option(help="Text column when INPUT is a table.")] = "text",
    as_json: JsonOption = False,
) -> None:
    """Classify inputs with an exported model through onnxruntime (no torch)."""
    from zmdevice.runtime import run_predict

    summary = run_predict(model, inputs, top_k=top_k, text_column=text_column)
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def evaluate(
    model: Annotated[
        Path, typer.Argument(help="A trained student folder or an exported .onnx file.")
    ],
    data: Annotated[Path, typer.Option(help="Labeled test data.")],
    device: DeviceOption = "auto",
    text_column: Annotated[str, typer.Option(help="Text column of a table.")] = "text",
    label_column: Annotated[str, typer.Option(help="Label column of a table.")] = "label",
    as_json: JsonOption = False,
) -> None:
    """Accuracy, macro-F1, per-class recall and confusion of a student on labeled data."""
    if model.suffix == ".onnx":
        from zmdevice.runtime import run_evaluate_onnx as run_evaluate
    else:
        from zmdevice.evaluate import run_evaluate_student as run_evaluate
    summary = run_evaluate(
        model, data, device=device, text_column=text_column, label_column=label_column
    )
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo's files.")] = Path(
        "demo-run"
    ),
    modality: Annotated[str, typer.Option(help="text or image.")] = "text",
    quick: Annotated[bool, typer.Option(help="A reduced run (fewer steps) for CI.")] = False,
    zero_shot: Annotated[
        bool,
        typer.Option(
            help="Train on the FM's zero-shot labels (the paper's protocol) instead of the "
            "labels chosen with the labeled examples."
        ),
    ] = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """The whole workflow on the embedded default data: label, train, export, predict."""
    from zmdevice.demo import run_demo

    summary = run_demo(out=out, modality=modality, quick=quick, device=device, zero_shot=zero_shot)
    emit_summary(summary, as_json, summary.get("lines", []))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
