"""`zmdevice train`: ZeroMatch (stage 1 KD, stage 2 SSL + auxiliary KD head) and baselines.

A run is a tuple of stage objects (``training.stages.METHOD_STAGES``); every stage goes
through the same loop. The pieces live in ``zmdevice.training``:

========================  ==================================================================
``training.data``         read and join the data files (``TrainData``), check they can train
``training.stages``       ``DistillStage``, ``SSLStage``: samplers, views, named losses;
                          ``METHOD_STAGES``; ``StepModel``, the one module a step calls
``training.loop``         ``Setup`` (frozen), the state dict, ``train_step``, ``Loop``
``training.evaluation``   held-out agreement, test accuracy, BatchNorm recalibration
``training.checkpoint``   the state dict to safetensors + JSON and back (``--resume``)
``training.budget``       ``--time-budget``: measure, plan the steps, stop on time
``training.guard``        the stage-2 collapse guard (rollback / distill / stop)
``training.average``      stage 2's weight average (``ssl_weight_average``)
``training.calibration``  ``--precision auto``: fp32 and bf16 steps measured
========================  ==================================================================

This module builds the setup, runs the stages and writes ``runs/models/NAME/``: the student
(``save_student``), ``train_config.toml`` (rerun with ``--config``), ``metrics.jsonl``,
``report.md``, ``curves.png`` and ``checkpoints/`` for ``--resume``; with ``--log`` the same
settings, records, report and curves also go to a tracker (``trackers.run_tracker``).

Where this departs from the reference runs, on purpose (each a ``TrainConfig`` field):
AdaMatch's EMA momentum is 0.99, not 0.999 (short CPU stages, see ``MODALITY_DEFAULTS``);
BatchNorm statistics are re-estimated on clean unlabeled images before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import time
from pathlib import Path

from zmdevice.config import METHODS, RUNS, TrainConfig, resolve_student
from zmdevice.errors import (
    UserError,
    check_writable,
    claim,
    disk_errors,
    missing_folders,
    remove_empty_folders,
    write_text_atomic,
)
from zmdevice.trackers import LOCAL_ARTIFACTS, LOCAL_STORE, log_final, run_tracker

PSEUDO_LABELS = "pseudo_labels.parquet"
"""The pseudo-labels a run makes itself when given none (``label_for_training``)."""
RUN_FILES = (
    PSEUDO_LABELS,
    "student.safetensors",
    "config.json",
    "tokenizer.json",
    "metrics.jsonl",
    "train_config.toml",
    "report.md",
    "curves.png",
    "checkpoints",
    "tensorboard",  # --log tensorboard's event files
    LOCAL_STORE,  # --log mlflow's local store and its artifacts
    LOCAL_ARTIFACTS,
)
"""What a run writes in its folder; another run's files there are refused or cleared."""


def default_out(config: TrainConfig) -> Path:
    preset = config.student.partition(":")[0]
    return Path(config.out) if config.out else RUNS / "models" / f"{preset}-{config.method}"


def claim_folder(config: TrainConfig, out: Path) -> list[Path]:
    """One run per folder: another run's files in ``out`` are refused unless --resume
    or --overwrite. Returns the files --overwrite will delete (once the setup is built, so
    a run that fails before training changes nothing)."""
    if config.resume:
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not config.overwrite:
        raise UserError(
            f"--out {out} holds another run ({', '.join(found)}): use --resume to continue "
            "it, another --out, or --overwrite to replace it"
        )
    return [out / name for name in found]


def delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def set_threads(config: TrainConfig, device, ranks) -> None:
    import torch

    from zmdevice.training.distributed import usable_cores

    if device.type == "cpu":
        torch.set_num_threads(config.threads or ranks.threads(usable_cores()))


def build_setup(config: TrainConfig, out: Path, ranks=None, clock=time.monotonic,
                budget_started: float | None = None):  # fmt: skip
    """Resolve everything a run needs once and freeze it: read and check the data, build the
    student, settle the settings (the student's defaults, then the precision and, with
    --time-budget, the planned steps), which nothing changes afterwards.

    ``clock`` and ``budget_started`` (``clock()`` when the run began) time the budget.
    """
    import numpy as np
    import torch

    from zmdevice.catalog import require_entry
    from zmdevice.device import resolve_device
    from zmdevice.precision import Hardware, choose_precision, model_family
    from zmdevice.students import build_student
    from zmdevice.training.budget import start_budget
    from zmdevice.training.calibration import calibrated_precision
    from zmdevice.training.data import build_data, check_data, data_fingerprints, load_data
    from zmdevice.training.distributed import Ranks
    from zmdevice.training.loop import Setup
    from zmdevice.training.stages import plan_stages

    preset = config.student.partition(":")[0]
    entry = require_entry(preset, "student", "--student")
    modality = entry.get("modality", "image")
    config = config.for_modality(modality, entry.get("train"), f"models/{preset}.toml")
    ranks = ranks or Ranks()
    device = ranks.start(resolve_device(config.device))
    set_threads(config, device, ranks)
    plans = plan_stages(config)
    ranks.check_config(plans, config)

    classes, labeled, unlabeled, pseudo, test = load_data(config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    overrides = {}
    if config.image_size and modality == "image":
        overrides["image_size"] = config.image_size
    if config.max_length and modality == "text":
        overrides["max_length"] = config.max_length
    student = build_student(config.student, classes, seed=config.seed, preprocess=overrides)
    data = build_data(config, student, classes, labeled, unlabeled, pseudo, test, out)
    check_data(data, plans, config)
    # Channels-last makes MobileNetV3's depthwise convolutions ~2.5x faster to train on CPU
    # (a no-op for text); saved weights keep the standard layout.
    student.to(device).use_channels_last()
    ranks.prepare(student, device)
    freeze = config.freeze_word_embeddings
    setup = Setup(
        config=config,
        plans=plans,
        data=data,
        student=student,
        device=device,
        precision=choose_precision(config.precision, Hardware.probe(device), model_family(student)),
        out=out,
        soft=config.soft_labels and METHODS[config.method].uses_fm,
        freeze_embeddings=device.type == "cpu" if freeze is None else freeze,
        fingerprints=data_fingerprints(config, labeled, unlabeled, test),
        ranks=ranks,
    )
    # ``auto``: a few steps of fp32 and bf16 measured here (or cached) replace the table;
    # the budget's probe then times steps at the precision the run trains in.
    setup = dataclasses.replace(setup, precision=calibrated_precision(setup, config.precision))
    budget = None
    if config.time_budget is not None:
        budget = start_budget(setup, clock, clock() if budget_started is None else budget_started)
    # The resolved precision is the run's setting: train_config.toml records it, and a
    # resume where ``auto`` resolves otherwise (another machine) is refused as a new run.
    # The planned steps replace kd_steps / ssl_steps the same way.
    steps = budget.step_settings(plans) if budget is not None else {}
    config = dataclasses.replace(config, precision=setup.precision.name, **steps)
    return dataclasses.replace(setup, config=config, plans=plan_stages(config), budget=budget)


LOCK = ".zmdevice.lock"
"""The lock file in a run folder while a run works in it (one run per folder at a time)."""


def claim_run(out: Path, ranks):
    """The claim on ``out`` for this process: rank 0 holds it for its whole launch (the other
    ranks of the same launch write nothing and must not lock each other out)."""
    if not ranks.is_main:
        return contextlib.nullcontext()
    out.mkdir(parents=True, exist_ok=True)
    return claim(out / LOCK, f"--out {out}")


def run_train(config: TrainConfig, on_step=None, clock=time.monotonic) -> dict:
    """Train a student as ``config`` says and write ``models/NAME/``.

    One run at a time works in a folder (``claim_run``). A fresh run that fails before its
    first checkpoint leaves nothing behind; a full disk is one ``UserError``.

    Args:
        config: the typed settings (CLI flags and ``--config`` file).
        on_step: optional plain callback ``on_step(setup, state, values)`` after every step
            (tests use it to interrupt a run).
        clock: seconds as a float, for --time-budget (tests pass a fake one).

    Returns:
        Summary dict; ``lines`` is the one-screen text the CLI prints.
    """
    from zmdevice.training.budget import check_time_budget
    from zmdevice.training.distributed import ranks_from_environment, worker_errors

    started, budget_started = time.perf_counter(), clock()
    config = resolve_student(config)
    out = default_out(config)
    check_writable(out, "--out", folder=True)
    check_time_budget(config.time_budget)
    ranks = ranks_from_environment()
    made = missing_folders(out) if ranks.is_main else []
    try:
        with worker_errors(ranks), claim_run(out, ranks), disk_errors(out):
            return train_in(config, out, ranks, on_step, clock, (started, budget_started))
    finally:
        remove_empty_folders(made)  # a run refused before it wrote anything leaves no folder


def train_in(config: TrainConfig, out: Path, ranks, on_step, clock, started) -> dict:
    """``run_train`` in a claimed folder: build (and plan), clear the previous run, train."""
    from zmdevice.training import checkpoint

    previous_run = claim_folder(config, out)
    config, made = label_for_training(config, out, ranks)
    if made is not None:  # just written: not the previous run's to delete
        previous_run = [path for path in previous_run if path.name != PSEUDO_LABELS]
    # Built and planned before --overwrite deletes anything: a refused budget changes nothing.
    setup = build_setup(config, out, ranks, clock, started[1])
    if ranks.is_main:  # rank 0 alone writes files (one process: always)
        delete(previous_run)
    try:
        summary = train_stages(setup, ranks, started[0], on_step)
    except BaseException:
        fresh = not config.resume and not (out / checkpoint.MANIFEST).exists()
        if ranks.is_main and fresh:
            delete([out / name for name in RUN_FILES])  # nothing to resume: leave nothing
        raise
    summary["lines"][1:1] = labels_lines(made, setup)
    if made is not None:
        summary["pseudo_labels_made"] = made
    return summary


def label_for_training(config: TrainConfig, out: Path, ranks) -> tuple[TrainConfig, dict | None]:
    """``config`` with pseudo-labels: as given, or made now from the labeled examples.

    A method that uses the FM and is given no pseudo-labels gets them as ``zmdevice label
    UNLABELED --few-shot LABELED --teacher T`` makes them (the label source cross-validation
    on the labeled examples picks), written to ``out/pseudo_labels.parquet``; a resumed run
    reuses that file.

    Returns:
        (the config naming the pseudo-labels, the label command's summary or None).
    """
    if config.pseudo_labels is not None or not METHODS[config.method].uses_fm:
        return config, None
    labels = out / PSEUDO_LABELS
    if config.resume and labels.is_file():
        return dataclasses.replace(config, pseudo_labels=labels), None
    if ranks.active:
        raise UserError(
            "a distributed run cannot make its own pseudo-labels: make them first with "
            "`zmdevice label UNLABELED --classes C --teacher T --few-shot LABELED` and pass "
            "--pseudo-labels"
        )
    from zmdevice.config import DEFAULT_TEACHERS, LabelConfig
    from zmdevice.data import open_dataset
    from zmdevice.labeling.run import run_label

    labeled = open_dataset(config.labeled, require_labels=True)
    teacher = config.teacher or DEFAULT_TEACHERS[labeled.modality]
    classes = config.classes or sorted(set(labeled.labels))
    made = run_label(
        LabelConfig(
            data=config.unlabeled,
            classes=",".join(classes) if isinstance(classes, list) else classes,
            teacher=teacher,
            out=labels,
            device=config.device,
            few_shot=config.labeled,
        )
    )
    return dataclasses.replace(config, pseudo_labels=labels), made


def labels_lines(made: dict | None, setup) -> list[str]:
    """The summary's lines about where the pseudo-labels came from."""
    if made is not None:
        source = next((line.strip() for line in made["lines"] if "labels: " in line), "")
        return [f"  pseudo-labels made with {made['teacher']} into {made['out']}: {source}"]
    teacher = setup.data.label_teacher
    made_from_labels = ("label_source", "few_shot", "refine")
    if teacher is not None and not any(teacher.get(key) for key in made_from_labels):
        return [
            "  note: these pseudo-labels are the FM's zero-shot ones; labels made with your "
            "labeled examples (`zmdevice label ... --few-shot LABELED`, or train without "
            "--pseudo-labels) were more accurate on each of the benchmark's dev sets"
        ]
    return []


def train_stages(setup, ranks, started: float, on_step=None) -> dict:
    """Run every stage from the start or the checkpoint; finish (rank 0) and summarise."""
    import torch

    from zmdevice.training import checkpoint
    from zmdevice.training.loop import MetricsLog, NullLog, StopTraining, begin_stage, new_state

    config, out, main = setup.config, setup.out, ranks.is_main
    state = new_state(setup)
    if config.resume:
        checkpoint.load(setup, state)
    else:
        begin_stage(setup, state)
    resumed_at = state["global_step"] if config.resume else None
    # The --log tracker is rank 0's; opened once the settings are resolved.
    kind = setup.config.log if setup.ranks.is_main else "none"
    with run_tracker(kind, setup.out) as tracker:
        keep = resumed_at if resumed_at else -1
        log = MetricsLog(out / "metrics.jsonl", keep, tracker) if main else NullLog()
        if main:
            settings = write_train_config(setup.config, out / "train_config.toml")
            if tracker is not None:
                tracker.log_params(settings)
        if setup.budget is not None and not config.resume:
            log.write(state, setup.plans[0], {"time_budget_plan": setup.budget.plan})
        save = checkpoint.save if main else lambda setup, state: None
        loop = make_loop(setup, log, save, on_step)
        try:
            fit(loop, state)
            # Rank 0 finishes alone (BatchNorm recalibration, test, save): leave the group
            # first, so that no layer waits for the other ranks.
            ranks.stop()
            if not main:
                return {"out": str(out), "rank": ranks.rank, "lines": []}
            summary = finish(setup, state, time.perf_counter() - started)
            if tracker is not None:
                log_final(tracker, summary, state["global_step"], out)
            return summary
        except StopTraining:
            line = (
                f"stopped after {state['global_step']} steps as asked (stop_after); "
                "continue with --resume"
            )
            lines = [line] if main else []
            return {"out": str(out), "stopped_at": state["global_step"], "lines": lines}
        except torch.OutOfMemoryError:
            from zmdevice.training.loop import out_of_memory

            raise out_of_memory(setup, state) from None
        finally:
            log.close()
            ranks.stop()


def make_loop(setup, log, save_checkpoint, on_step=None):
    """The run's loop with its handlers, in the order they act on each event."""
    from zmdevice.training import average
    from zmdevice.training import loop as training_loop
    from zmdevice.training.guard import add_guard

    loop = training_loop.Loop(setup, log, save_checkpoint)
    loop.add_callback("on_batch_end", average.step_average)
    loop.add_callback("on_evaluate", average.evaluate_average)
    loop.add_callback("on_evaluate", training_loop.evaluate_and_select)
    add_guard(loop)  # on_stage_start, on_evaluate
    loop.add_callback("on_step_end", training_loop.save_periodically)
    if on_step is not None:
        loop.add_callback(
            "on_step_end", lambda loop, state: on_step(loop.setup, state, loop.values)
        )
    if setup.budget is not None:
        loop.add_callback("on_step_end", setup.budget.stop_on_time)
    loop.add_callback("on_step_end", training_loop.stop_after)
    loop.add_callback("on_stage_end", training_loop.restore_best)
    loop.add_callback("on_stage_end", average.end_average)
    return loop


def fit(loop, state: dict) -> None:
    """Run the stages from ``state``'s on; each next one begins with a checkpoint."""
    from zmdevice.training.loop import begin_stage, stage_plans

    setup = loop.setup
    while state["stage_index"] < len(stage_plans(setup, state)):
        loop.run_stage(state)
        setup.ranks.share_weights(setup.student)  # rank 0 alone keeps ``best``
        if state["stopped"]:
            break  # out of time, or a collapse: finish with the weights at hand
        state["stage_index"] += 1
        state["step"] = 0
        if state["stage_index"] < len(stage_plans(setup, state)):
            begin_stage(setup, state)
            loop.save_checkpoint(setup, state)


def finish(setup, state: dict, seconds: float) -> dict:
    """Recalibrate BatchNorm, test, save the student and the report; the summary."""
    from zmdevice.report import write_report
    from zmdevice.students import save_student
    from zmdevice.training.evaluation import final_test_report, recalibrate

    recalibrated = recalibrate(setup)
    final = final_test_report(setup)
    save_student(setup.student, setup.out)
    summary = build_summary(setup, state, final, recalibrated, seconds)
    write_report(setup.out, summary)
    return summary


def write_train_config(config: TrainConfig, path: Path) -> dict:
    """``train_config.toml``: every setting of this run, loadable with ``--config``.

    Returns the values written (what a ``--log`` tracker records as the run's parameters).
    """
    import tomli_w

    values = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in ("resume", "overwrite", "stop_after") or value is None:
            continue
        values[item.name] = str(value) if isinstance(value, Path) else value
    write_text_atomic(path, tomli_w.dumps(values))
    return values


def build_summary(setup, state: dict, final: dict, recalibrated: int, seconds: float) -> dict:
    """The dict ``run_train`` returns, with the CLI's ``lines``."""
    from zmdevice.training.budget import summary_line as budget_line
    from zmdevice.training.guard import summary_line as guard_line

    config, data, best = setup.config, setup.data, state["best"]
    stages = state["stage_summaries"]
    summary = {
        "out": str(setup.out),
        "method": config.method,
        "student": config.student,
        "device": str(setup.device),
        "precision": setup.precision.name,
        "precision_reason": setup.precision.reason,
        "classes": data.classes,
        "labeled": len(data.labeled_y),
        "unlabeled": data.num_pool,
        "stages": stages,
        "seconds": round(seconds, 1),
        "bn_recalibrated_on": recalibrated,
    }
    if best:
        summary["heldout_agreement"] = best["agreement"]
        summary["best_kd_step"] = best["step"]
    if setup.budget is not None:
        summary["time_budget"] = setup.budget.record()
    summary["stopped"] = state["stopped"]
    if state["guard"] and state["guard"].get("fired"):
        summary["collapse"] = state["guard"]["fired"]
    summary.update(final)
    lines = [
        f"trained {config.student} with {config.method} on {summary['device']} in "
        f"{summary['seconds']:.0f} s ({len(data.labeled_y)} labeled, "
        f"{data.num_pool} unlabeled, {len(data.classes)} classes)",
        f"  precision {setup.precision.name} ({setup.precision.reason})",
    ]
    for stage in stages:
        lines.append(f"  {stage['stage']}: {stage['steps']} steps, {stage['seconds']:.1f} s")
    if best:
        lines.append(
            f"  distillation's held-out agreement with the FM: {100 * best['agreement']:.1f}% "
            f"(step {best['step']})"
        )
    lines += [line for line in (budget_line(setup.budget, state), guard_line(state)) if line]
    if "test_accuracy" in final:
        lines.append(
            f"  test accuracy {100 * final['test_accuracy']:.1f}%, "
            f"macro-F1 {100 * final['test_macro_f1']:.1f}%"
        )
    lines.append(f"  saved to {setup.out} (metrics.jsonl, report.md, curves.png)")
    summary["lines"] = lines
    return summary
