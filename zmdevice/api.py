"""The Python API: ``zmdevice.label``, ``train``, ``export``, ``load``, ``suggest``, ``check``.

Each function is the CLI command of the same name: it fills the same typed config
(``zmdevice.config``) and calls the same stage function (``run_label``, ``run_train``,
``run_export``), so a script and the command line write the same files and raise the same
``UserError`` messages. What the API adds:

- **In-memory data.** Wherever the CLI takes a data path, the API also takes a pandas
  DataFrame, a ``datasets.Dataset``, a list of texts, images or image paths, or
  ``(item, label)`` pairs of those (``zmdevice.inputs`` writes them once to files the
  stages read).
- **Results as objects**: ``label`` returns the ``PseudoLabels`` it wrote (``.path``,
  ``.summary``); ``train`` a ``TrainedStudent`` (``.out``, ``.predict``, ``.predict_proba``,
  ``.evaluate``); ``load`` a torch-free ``Classifier`` for an exported ONNX file.
- ``progress=False`` turns the progress bars off; ``on_step`` receives each record that
  training logs to ``metrics.jsonl``.

Every argument is checked before any data is read or model built, by the same typed configs
as the command line: a value of the wrong type (a string for a number included: ``"0.1"``
is refused, as in a ``--config`` file, not converted), a bool or a fraction where an
integer is meant, a non-finite number or one out of range raises ``UserError`` with a
one-line message naming the argument. Items to classify are a list (or tuple, array,
DataFrame): a bare string, path, image or dict is refused rather than guessed at.

Outputs default to the CLI's paths under ``runs/`` in the working folder:
``runs/labels/NAME-TEACHER.parquet``, ``runs/models/STUDENT-METHOD/`` and
``runs/export/NAME.onnx``.

Only the standard library, numpy and the torch-free runtime are imported here; torch comes
in with the function that trains or evaluates a student.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from zmdevice.config import DataOptions, ExportConfig, LabelConfig, TrainConfig, check_device, shown
from zmdevice.errors import UserError
from zmdevice.inputs import class_spec, data_path
from zmdevice.predictors import Classifier, TrainedStudent, check_options, check_path
from zmdevice.predictors import as_items as _as_items  # noqa: F401  (tests import it from here)
from zmdevice.pseudolabels import PseudoLabels

# --------------------------------------------------------------------------- run helpers


class _NotATerminal:
    """A stream that forwards everything but says it is not a terminal: progress bars
    (tqdm with ``disable=None``) then stay off, while warnings still reach the user."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show the stages' progress bars (on a terminal) or hide them, ours and Hugging
    Face's (model loading)."""
    if enabled:
        yield
        return
    with _hugging_face_bars_off(), contextlib.redirect_stderr(_NotATerminal(sys.stderr)):
        yield


@contextlib.contextmanager
def _hugging_face_bars_off() -> Iterator[None]:
    try:
        from huggingface_hub import utils as hub
    except ImportError:  # the runtime-only install: no model loading that shows bars
        yield
        return
    was_on = not hub.are_progress_bars_disabled()
    hub.disable_progress_bars()
    # transformers copies the switch when it is imported and keeps its own from then on.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging = sys.modules.get("transformers.utils.logging")
            # transformers' switch turns the hub's back on too.
            (hf_logging.enable_progress_bar if hf_logging else hub.enable_progress_bars)()


def _field_names(config_class) -> set[str]:
    return {item.name for item in dataclasses.fields(config_class)}


def _check_switch(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False, got {shown(value)}")


def _callbacks(on_step: Any) -> list[Callable[[dict], Any]]:
    """``on_step`` as a list of callables: None, one callable, or a list/tuple of them."""
    if on_step is None:
        return []
    if callable(on_step):
        return [on_step]
    if isinstance(on_step, list | tuple) and all(callable(item) for item in on_step):
        return list(on_step)
    raise UserError(
        f"on_step must be a callable or a list of callables (each given a dict), got "
        f"{shown(on_step)}"
    )


# --------------------------------------------------------------------------- label


@dataclasses.dataclass
class LabelFile(PseudoLabels):
    """The pseudo-labels ``zmdevice.label`` wrote, with where and how."""

    path: Path | None = None
    """The Parquet file (give it, or this object, to ``train``)."""
    summary: dict = dataclasses.field(default_factory=dict)
    """What the CLI prints (``summary["lines"]``) and ``--json`` gives."""


def label(
    data: Any,
    classes: Any,
    teacher: str,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    **options: Any,
) -> LabelFile:
    """Run a foundation model zero-shot once over ``data``: `zmdevice label`.

    Args:
        data: a path as for the CLI, or in-memory data (module docstring).
        classes: a list of class names, a dict of name -> prompt(s), or what ``--classes``
            takes (comma list, class file).
        teacher: a catalog name (``minilm``, ``efficientnet-lite0``) or ``kind:spec``.
        out: the Parquet file; default ``runs/labels/<data name>-<teacher>.parquet``.
        progress: False hides the progress bar.
        **options: any other ``LabelConfig`` field (``batch_size``, ``device``, ``top_k``,
            ``gold`` and ``few_shot`` (labeled data as above), ``resume``, ``shard``,
            ``templates``, ``workers``, ``combine``, ``refine``, ...) or ``DataOptions``
            field (``text_column``, ``skip_corrupt``, ...).

    Returns:
        The pseudo-labels (a ``PseudoLabels``) with ``.path`` and ``.summary``.
    """
    from zmdevice.labeling.run import run_label
    from zmdevice.pseudolabels import read_pseudolabels

    _check_switch(progress, "progress")
    label_fields = _field_names(LabelConfig) - {"data", "classes", "teacher", "out"}
    label_fields.discard("data_options")
    data_fields = _field_names(DataOptions)
    check_options(options, label_fields | data_fields, "label")
    data_options = DataOptions(**{k: v for k, v in options.items() if k in data_fields})
    settings = {k: v for k, v in options.items() if k in label_fields}
    for key in ("gold", "few_shot"):  # labeled data, in any form the API takes data
        if settings.get(key) is not None:
            settings[key] = data_path(settings[key], key, data_options)
    config = LabelConfig(
        data=data_path(data, "data", data_options),
        classes=class_spec(classes),
        teacher=teacher,
        out=out,
        data_options=data_options,
        **settings,
    )
    with progress_bars(progress):
        summary = run_label(config)
    labels = read_pseudolabels(summary["out"])
    fields = {item.name: getattr(labels, item.name) for item in dataclasses.fields(PseudoLabels)}
    return LabelFile(**fields, path=Path(summary["out"]), summary=summary)


# --------------------------------------------------------------------------- train


def _metrics_forwarder(callbacks: list[Callable[[dict], Any]]):
    """An ``on_step(run, values)`` for ``run_train`` that hands each new ``metrics.jsonl``
    record (a logged step or an evaluation) to every callback, as a dict."""
    read_up_to = {"offset": 0}

    def on_step(setup, state, values) -> None:
        path = Path(setup.out) / "metrics.jsonl"
        if not path.is_file():
            return
        with path.open(encoding="utf-8") as handle:
            handle.seek(read_up_to["offset"])
            fresh = handle.read()
        # Only whole lines: the log is flushed line by line, but be safe.
        complete = fresh[: fresh.rfind("\n") + 1]
        read_up_to["offset"] += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            if line.strip():
                record = json.loads(line)
                for callback in callbacks:
                    callback(record)

    return on_step


def train(
    labeled: Any,
    unlabeled: Any,
    pseudo_labels: PseudoLabels | str | os.PathLike | None = None,
    student: str | None = None,
    method: str = TrainConfig.method,
    device: str = TrainConfig.device,
    out: str | os.PathLike | None = None,
    *,
    test: Any = None,
    progress: bool = True,
    on_step: Callable[[dict], Any] | Sequence[Callable[[dict], Any]] | None = None,
    **hyper: Any,
) -> TrainedStudent:
    """Train a student: `zmdevice train` (stage 1 KD, stage 2 SSL + auxiliary KD head).

    Args:
        labeled: the few true labels: a path, a DataFrame with a label column, or a list
            of ``(item, label)`` pairs.
        unlabeled: the training pool (labeled samples included), as data above.
        pseudo_labels: what ``label`` returned, or the path of a pseudo-label file; needed by
            ``zeromatch``, ``kd`` and ``naive-pl``.
        student: a student preset; default by the labeled data's modality,
            ``DEFAULT_STUDENTS`` (``efficientnet_lite0`` for images, ``distilbert`` for text),
            as on the command line.
        method: zeromatch, kd, supervised, fixmatch, adamatch or naive-pl.
        device: auto, cpu, cuda, cuda:N or mps; auto (the CLI's default) takes a GPU when
            there is one.
        out: the output folder; default ``runs/models/<student>-<method>``.
        test: labeled test data, evaluated periodically and at the end (``gold_unlabeled``
            in ``hyper`` takes data the same ways).
        progress: False hides the progress bars.
        on_step: a callable (or a list of them) given each record written to
            ``metrics.jsonl``: ``stage``, ``step``, ``global_step`` and the named losses of a
            logged step, or the evaluation values.
        **hyper: ``kd_steps``, ``ssl_steps``, ``seed``, ``soft_labels``, ``allow_partial``,
            ``resume``, or any hyper-parameter of a ``--config`` file (``lr``,
            ``kd_batch_size``, ``ssl_loss``, ...).
    """
    from zmdevice.training.run import run_train

    _check_switch(progress, "progress")
    callbacks = _callbacks(on_step)
    pseudo_labels = _label_file(pseudo_labels)
    named = {"labeled", "unlabeled", "pseudo_labels", "student", "method", "device", "out", "test"}
    check_options(hyper, _field_names(TrainConfig) - named, "train")
    if hyper.get("gold_unlabeled") is not None:
        hyper["gold_unlabeled"] = data_path(hyper["gold_unlabeled"], "gold_unlabeled")
    # The student, when None, follows the labeled data's modality: run_train settles it.
    config = TrainConfig(
        labeled=data_path(labeled, "labeled"),
        unlabeled=data_path(unlabeled, "unlabeled"),
        pseudo_labels=pseudo_labels,
        student=student,
        method=method,
        device=device,
        out=out,
        test=data_path(test, "test") if test is not None else None,
        **hyper,
    )
    with progress_bars(progress):
        summary = run_train(config, on_step=_metrics_forwarder(callbacks) if callbacks else None)
    return TrainedStudent(summary["out"], summary)


# --------------------------------------------------------------------------- export, load


def _label_file(pseudo_labels: Any) -> Any:
    """The path of a pseudo-label file given as what ``label`` returned or as a path."""
    if not isinstance(pseudo_labels, PseudoLabels):
        return pseudo_labels
    if getattr(pseudo_labels, "path", None) is None:
        raise UserError(
            "pseudo_labels: give the object zmdevice.label returned, or the path of a "
            "pseudo-label file"
        )
    return pseudo_labels.path


def _loop_command(config_class, run, required: dict, options: dict, name: str) -> dict:
    """``suggest``/``check``: the data arguments as paths, the rest checked as the CLI's."""
    check_options(options, _field_names(config_class) - set(required) - {"data_options"}, name)
    data_fields = _field_names(DataOptions)
    data_options = DataOptions(**{k: options.pop(k) for k in list(options) if k in data_fields})
    paths = {
        key: _label_file(value) if key == "pseudo_labels" else data_path(value, key, data_options)
        for key, value in required.items()
    }
    if options.get("labeled") is not None:
        options["labeled"] = data_path(options["labeled"], "labeled", data_options)
    return run(config_class(**paths, **options, data_options=data_options))


def suggest(data: Any, pseudo_labels: PseudoLabels | str | os.PathLike, **options: Any) -> dict:
    """Rank unlabeled samples to label next: `zmdevice suggest`.

    Args:
        data: the unlabeled data the label file labels (a path or in-memory data, as
            ``label`` takes it).
        pseudo_labels: what ``label`` returned, or the path of its file.
        **options: the command's settings (``n``, ``labeled``, ``student``, ``exclude`` (a
            list), ``out``, ``format``, ``seed``, ...; ``zmdevice suggest --help``).

    Returns:
        The summary: ``out`` (the CSV or Label Studio tasks written), ``mode`` (cold start
        or uncertainty) and ``rows`` (the suggestions, best first, as dicts).
    """
    from zmdevice.curation.settings import SuggestConfig
    from zmdevice.curation.suggest import run_suggest

    required = {"data": data, "pseudo_labels": pseudo_labels}
    return _loop_command(SuggestConfig, run_suggest, required, options, "suggest")


def check(
    labeled: Any, data: Any, pseudo_labels: PseudoLabels | str | os.PathLike, **options: Any
) -> dict:
    """Rank labeled examples by how likely their label is wrong: `zmdevice check`.

    Returns:
        The summary: ``out`` (the ranked CSV), ``rows`` (most suspicious first, with the
        suggested label), ``flagged`` and ``pseudo_label_suspects`` (per class).
    """
    from zmdevice.curation.check import run_check
    from zmdevice.curation.settings import CheckConfig

    required = {"labeled": labeled, "data": data, "pseudo_labels": pseudo_labels}
    return _loop_command(CheckConfig, run_check, required, options, "check")


def export(
    model_or_dir: TrainedStudent | str | os.PathLike,
    out: str | os.PathLike | None = None,
    quantize: str | None = None,
    **options: Any,
) -> Path:
    """Export a trained student to one ONNX file: `zmdevice export`.

    Args:
        model_or_dir: what ``train`` returned, or a student folder.
        out: the .onnx file; default ``runs/export/<folder name>.onnx``.
        quantize: "int8" also writes ``NAME.int8.onnx``.
        **options: ``test`` (labeled data: compare int8 with fp32), ``calibration``
            (images for static int8), ``opset``, ``format``, the model card's
            ``card_license``, ``card_language``, ``card_dataset`` (lists of strings),
            ``card_intended_use``, and ``hub_folder`` (also a folder for
            ``huggingface_hub.upload_folder``).

    Returns:
        The fp32 .onnx path (its model card ``NAME.README.md`` and, for text,
        ``NAME.tokenizer.json`` lie beside it).
    """
    from zmdevice.exporting.run import run_export

    accepted = _field_names(ExportConfig) - {"model_dir", "out", "quantize"}
    check_options(options, accepted, "export")
    if isinstance(model_or_dir, TrainedStudent):
        model_dir = model_or_dir.out
    else:
        model_dir = check_path(
            model_or_dir, "model_or_dir", "what zmdevice.train returned or a student folder"
        )
    for key in ("test", "calibration"):
        if options.get(key) is not None:
            options[key] = data_path(options[key], key)
    config = ExportConfig(model_dir=model_dir, out=out, quantize=quantize, **options)
    return Path(run_export(config)["onnx"])


def load(path: str | os.PathLike, *, device: str = "cpu") -> Classifier | TrainedStudent:
    """An exported ``.onnx`` file as a torch-free ``Classifier``; a student folder
    (``models/NAME``) as a ``TrainedStudent``."""
    path = check_path(path, "path", "an exported .onnx file or a trained student folder")
    check_device(device)
    if path.is_dir():
        from zmdevice.students import read_student_config

        read_student_config(path)  # UserError when the folder is not a trained student
        return TrainedStudent(path, device=device)
    return Classifier(path, device=device)
