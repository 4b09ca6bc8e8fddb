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

from zmdevice.errors import UserError

app = typer.Typer(
    name="zmdevice",
    help="ZeroMatch on small hardware: label with a foundation model, train a small student "
    "on CPU, export to ONNX, predict with onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors_exit_2(command):
    """Turn ``UserError`` (and a missing optional dependency) into one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def emit_summary(summary: dict, as_json: bool, lines: list[str]) -> None:
    """Print a one-screen summary, or the machine-readable ``summary`` with ``--json``."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


DeviceOption = Annotated[
    str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", show_default=True)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]


@app.command()
@user_errors_exit_2
def label(
    data: Annotated[
        Path, typer.Argument(help="Text table (CSV/JSONL/Parquet) or image folder/table.")
    ],
    classes: Annotated[str, typer.Option(help="Comma list, one-per-line file, or TOML/JSON.")],
    teacher: Annotated[
        str, typer.Option(help="Catalog name (minilm, efficientnet-lite0) or kind:spec.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output file (default labels/NAME.parquet).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.")] = 64,
    device: DeviceOption = "auto",
    top_k: Annotated[
        int | None,
        typer.Option(help="Most probabilities kept per sample (default: all classes up to 1024)."),
    ] = None,
    gold: Annotated[
        Path | None, typer.Option(help="Labeled data: report the teacher's accuracy on it.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    shard: Annotated[str | None, typer.Option(help="Label only slice I of N, as I/N.")] = None,
    templates: Annotated[
        str | None,
        typer.Option(help="CLIP prompt templates: 'paper' (default), 'openai', or a file."),
    ] = None,
    text_column: Annotated[str, typer.Option(help="Text column of a table.")] = "text",
    id_column: Annotated[str, typer.Option(help="Id column of a table.")] = "id",
    label_column: Annotated[str, typer.Option(help="Label column of a table.")] = "label",
    path_column: Annotated[str, typer.Option(help="Path column of an image table.")] = "path",
    skip_corrupt: Annotated[
        bool, typer.Option(help="Skip and count unreadable images instead of failing.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data-loading worker processes (default: 0 for text; cores-1, at most 4, for images)."
        ),
    ] = None,
    combine: Annotated[
        bool,
        typer.Option(help="Join the shard files NAME.shard-I-of-N.parquet into --out."),
    ] = False,
    few_shot: Annotated[
        Path | None,
        typer.Option(
            help="Labeled data: adapt the teacher to it in its feature space (a probe times "
            "the zero-shot probabilities) before labeling; text-embed and imagenet teachers."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a foundation model zero-shot once and write the pseudo-label file."""
    from zmdevice.config import DataOptions, LabelConfig

    config = LabelConfig(
        data=data,
        classes=classes,
        teacher=teacher,
        out=out,
        batch_size=batch_size,
        device=device,
        top_k=top_k,
        gold=gold,
        resume=resume,
        shard=shard,
        templates=templates,
        workers=workers,
        combine=combine,
        data_options=DataOptions(
            text_column=text_column,
            id_column=id_column,
            label_column=label_column,
            path_column=path_column,
            skip_corrupt=skip_corrupt,
        ),
    )
    from zmdevice.label import run_label

    summary = run_label(config, few_shot=few_shot)
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def train(
    labeled: Annotated[
        Path, typer.Option(help="Labeled data (table with a label column, or class folders).")
    ],
    unlabeled: Annotated[Path, typer.Option(help="Unlabeled training data.")],
    pseudo_labels: Annotated[
        Path | None, typer.Option(help="Pseudo-label file from `zmdevice label`.")
    ] = None,
    student: Annotated[
        str,
        typer.Option(help="mobilenet_v3_small, mobilenet_v3_large, distilbert, or a tiny preset."),
    ] = "mobilenet_v3_small",
    out: Annotated[Path | None, typer.Option(help="Output folder (default models/NAME).")] = None,
    device: DeviceOption = "auto",
    method: Annotated[
        str, typer.Option(help="zeromatch, kd, supervised, fixmatch, adamatch or naive-pl.")
    ] = "zeromatch",
    kd_steps: Annotated[int | None, typer.Option(help="Stage-1 (distillation) steps.")] = None,
    ssl_steps: Annotated[int | None, typer.Option(help="Stage-2 (SSL) steps.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with any TrainConfig field.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = False,
    test: Annotated[
        Path | None, typer.Option(help="Labeled test data for periodic evaluation.")
    ] = None,
    soft_labels: Annotated[
        bool | None, typer.Option(help="Distil the FM's probabilities (KL) instead of hard labels.")
    ] = None,
    allow_partial: Annotated[
        bool, typer.Option(help="Train on the ids the pseudo-label file covers.")
    ] = False,
    ssl_loss: Annotated[
        str | None, typer.Option(help="L_u of zeromatch: adamatch (default) or fixmatch.")
    ] = None,
    alpha: Annotated[
        str | None, typer.Option(help="KD weight alpha_t: ramp (default, 0 -> 1) or constant.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Train a student: stage 1 distils the FM, stage 2 SSL with the auxiliary KD head.

    Further settings (batch sizes, learning rates, threshold, EMA, checkpoint interval, ...)
    go in the --config TOML file; train_config.toml in the output lists them all.
    """
    from zmdevice.config import load_train_config

    overrides = dict(
        labeled=labeled,
        unlabeled=unlabeled,
        pseudo_labels=pseudo_labels,
        student=student,
        out=out,
        device=device,
        method=method,
        kd_steps=kd_steps,
        ssl_steps=ssl_steps,
        seed=seed,
        resume=resume,
        test=test,
        soft_labels=soft_labels,
        allow_partial=allow_partial,
    )
    train_config = load_train_config(config, overrides)
    # Flags for hyper-parameters land beside the --config file's keys (the flag wins).
    train_config.extra.update(
        {key: value for key, value in (("ssl_loss", ssl_loss), ("alpha", alpha)) if value}
    )
    from zmdevice.train import run_train

    summary = run_train(train_config)
    emit_summary(summary, as_json, summary.get("lines", []))


@app.command()
@user_errors_exit_2
def export(
    model_dir: Annotated[Path, typer.Argument(help="A trained student folder (models/NAME).")],
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
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    as_json: JsonOption = False,
) -> None:
    """Export a trained student to one self-contained ONNX file (main head only)."""
    from zmdevice.config import ExportConfig
    from zmdevice.export import run_export

    summary = run_export(
        ExportConfig(
            model_dir=model_dir,
            out=out,
            quantize=quantize,
            test=test,
            calibration=calibration,
            opset=opset,
        )
    )
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
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """The whole workflow on the embedded default data: label, train, export, predict."""
    from zmdevice.demo import run_demo

    summary = run_demo(out=out, modality=modality, quick=quick, device=device)
    emit_summary(summary, as_json, summary.get("lines", []))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
