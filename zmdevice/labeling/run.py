"""`zmdevice label`: run a foundation model zero-shot once over the data, write pseudo-labels.

``run_label`` is a sequence of steps, each a function below: plan (the output, the engine),
open the inputs (classes, data, gold), set the run up (the parts folder, the teacher, the
chunks, the file's metadata), label the chunks through the engine, then join the parts,
make the chosen labels from them (few-shot, refined), measure the teacher on the gold
labels and write the output atomically.

The run streams: the engine labels ``CHUNK_BATCHES`` batches at a time and hands each
finished chunk back; this process writes it as one "part" file in ``.NAME.parquet.parts/``
beside the output (``zmdevice.labeling.parts``). Parts are complete pseudo-label files
written atomically, so a killed run loses at most one chunk: ``--resume`` checks that the
parts were made with the same settings, skips the samples they hold and labels the rest. At
the end the parts are joined, in data order, into the output file (one row group per chunk)
and the folder is removed. Because chunk boundaries depend only on the data order and the
batch size, a resumed run writes the same rows as an uninterrupted one.

The engine is chosen once (``make_engine``): ``LocalEngine`` (this
process and its loader workers) or ``RayEngine`` (a Ray Data actor pool). Both label the
same chunks in the same batches, so either can resume the other's parts. ``--shard I/N``
and ``--combine`` are ``labeling.shards``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmdevice.config import LabelConfig
from zmdevice.errors import UserError, check_writable
from zmdevice.labeling.batches import ChunkJob, pick_workers
from zmdevice.labeling.engines import Engine
from zmdevice.labeling.from_examples import (
    LabeledExamples,
    allowed_sources,
    choose_before_labeling,
    labels_from_features,
    needs_features,
    open_few_shot,
)
from zmdevice.labeling.gold import Gold
from zmdevice.labeling.join import combine_pseudolabels
from zmdevice.labeling.parts import (
    check_parts,
    check_same_numerics,
    claim_parts,
    finished_parts,
    labels_by_id,
    read_parts_outputs,
    read_run,
    start_parts,
    write_part,
    write_part_features,
)
from zmdevice.labeling.shards import (
    combine_shards,
    default_out,
    parse_shard,
    shard_path,
    shard_range,
)
from zmdevice.labeling.summary import summary
from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata, read_pseudolabel_metadata
from zmdevice.topk import DEFAULT_MANTISSA_BITS, DEFAULT_MAX_KL, default_top_k

CHUNK_BATCHES = 32
"""Batches per part file: the most work a killed run can lose, and the window texts are
sorted by length in (``labeling_order``): on 2,000 WordNet definitions at batch 64, MiniLM
computes 1.08x the real tokens in chunks of 32 batches, 1.20x in chunks of 16 (the longest
texts of every chunk pad its last batch)."""
REFINE_WRITE_ROWS = 65536
"""Rows per row group of a refined output file."""


def run_label(config: LabelConfig) -> dict:
    """Label ``config.data`` with ``config.teacher``; see the module docstring.

    ``config.few_shot``: a labeled data set the teacher is adapted to first
    (``zmdevice.fewshot``).

    Returns:
        Summary dict (output path, counts, throughput, sizes, quality) with ``lines``.
    """
    engine = make_engine(config)
    out = Path(config.out or default_out(Path(config.data), config.teacher, made_tag(config)))
    check_writable(out, "--out", suffix=".parquet")
    if config.combine:
        started = time.perf_counter()
        joined = combine_shards(out, config.teacher, config.classes)
        return summary(out, joined, 0, time.perf_counter() - started, [], 0, "-")
    engine.check()
    inputs = open_inputs(config, out)
    with contextlib.ExitStack() as claims:  # held from the claim of the output to the end
        run = set_up(config, engine, inputs, claims)
        started = time.perf_counter()
        labeled_now = _label_chunks(engine, run.job, run.metadata)
        elapsed = time.perf_counter() - started
        metadata, quality_lines = write_output(run)
        shutil.rmtree(run.job.parts_dir, ignore_errors=True)
        where = engine.where(run.device)
        return summary(
            inputs.out, metadata, labeled_now, elapsed, quality_lines, run.job.workers, where
        )


def make_engine(config: LabelConfig) -> Engine:
    """The engine ``config.engine`` names, built whole from the config (the one place
    that reads ``config.engine``; here, so the config stays in this module)."""
    if config.engine == "ray":
        from zmdevice.labeling.ray_engine import RayEngine

        return RayEngine(
            address=config.ray_address, workers=config.ray_workers,
            gpus_per_worker=config.gpus_per_worker, teacher=config.teacher,
            templates=config.templates, precision=config.precision, runtime=config.runtime,
        )  # fmt: skip
    from zmdevice.labeling.local_engine import LocalEngine

    return LocalEngine(device=config.device)


def made_tag(config: LabelConfig) -> str | None:
    """How the labels are made, for their default file name (``default_out``): chosen or
    refined from labeled examples share one name (the same sources compete), the few-shot
    adapter's own labels (``--no-refine``) get another, so neither replaces the other."""
    if config.few_shot is not None:
        return "fewshot-norefine" if config.refine is False else "fewshot"
    return "refined" if config.refine else None


@dataclass(frozen=True)
class Inputs:
    """What the config names, opened and checked; nothing written yet."""

    out: Path
    """This run's output file (its shard's file with ``--shard``)."""
    shard: tuple[int, int] | None
    classes: Any
    """The ``ClassList``."""
    class_prior: Any
    dataset: Any
    indices: range
    """The positions in ``dataset`` this run labels (its shard's)."""
    gold: Gold | None


def open_inputs(config: LabelConfig, out: Path) -> Inputs:
    """Classes, class prior, data and gold opened and checked against the teacher."""
    from zmdevice.classes import load_class_prior, load_classes
    from zmdevice.data import open_dataset
    from zmdevice.teachers import teacher_modality

    shard = parse_shard(config.shard)
    classes = load_classes(config.classes)
    class_prior = None
    if config.class_prior is not None:
        class_prior = load_class_prior(config.class_prior, classes)
    dataset = open_dataset(config.data, config.data_options)
    modality = teacher_modality(config.teacher)
    if modality != dataset.modality:
        raise UserError(
            f"--teacher {config.teacher} labels {modality}s but {config.data} holds "
            f"{dataset.modality}s: pick a {dataset.modality} teacher"
        )
    gold = None
    if config.gold is not None:
        gold = Gold.open(config.gold, config.data_options, classes)
    indices = shard_range(len(dataset), *shard) if shard else range(len(dataset))
    if len(indices) == 0:
        raise UserError(f"{config.data}: no samples to label (shard {config.shard} is empty)")
    out = shard_path(out, *shard) if shard is not None else out
    return Inputs(out, shard, classes, class_prior, dataset, indices, gold)


@dataclass(frozen=True)
class Run:
    """One labeling run set up, frozen: what the chunk loop and the final write read."""

    inputs: Inputs
    job: ChunkJob
    metadata: dict
    """The metadata of every part file (and so of the output)."""
    created: str
    """When the run (or the interrupted one it resumes) began."""
    examples: LabeledExamples | None
    allowed: tuple[str, ...]
    """The label sources to choose from (``sources.allowed_sources``)."""
    device: Any
    """The driver teacher's torch device."""


def set_up(
    config: LabelConfig, engine: Engine, inputs: Inputs, claims: contextlib.ExitStack
) -> Run:
    """Claim the output, check an interrupted run's parts, build the teacher, plan the
    chunks and start (or reopen) the parts folder."""
    from zmdevice.device import resolve_device

    parts_dir = inputs.out.with_name(f".{inputs.out.name}.parts")
    claims.enter_context(claim_parts(parts_dir, inputs.out))  # one run at a time on this output
    top_k = config.top_k or default_top_k(len(inputs.classes))
    settings = _settings(config, inputs, top_k)
    labeled = None
    if config.few_shot is not None:
        labeled = open_few_shot(config.few_shot, config.data_options, inputs.classes)
        settings["few_shot"] = labeled.fingerprint()
    done = check_parts(parts_dir, settings, config.resume, inputs.out)
    device = resolve_device(engine.driver_device)
    teacher, info, examples, allowed, with_features = open_teacher(
        config, inputs, device, parts_dir, done, labeled
    )
    check_same_numerics(parts_dir, done, info)
    run = read_run(parts_dir) if done else start_parts(parts_dir, settings)
    chunk = config.batch_size * CHUNK_BATCHES
    job = ChunkJob(
        dataset=inputs.dataset, teacher=teacher, classes=inputs.classes,
        chunks=[inputs.indices[s : s + chunk] for s in range(0, len(inputs.indices), chunk)],
        done=frozenset(done), batch_size=config.batch_size,
        workers=pick_workers(config.workers, teacher), parts_dir=parts_dir,
        with_features=with_features,
    )  # fmt: skip
    metadata = file_metadata(config, inputs, info, top_k, settings, run["created"])
    return Run(inputs, job, metadata, run["created"], examples, allowed, device)


def _settings(config: LabelConfig, inputs: Inputs, top_k: int) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {
        "data": str(Path(config.data).resolve()),
        "fingerprint": inputs.dataset.fingerprint(),
        "classes": config.classes,
        "teacher": config.teacher,
        "templates": config.templates,
        "top_k": top_k,
        "shard": list(inputs.shard) if inputs.shard else None,
        "batch_size": config.batch_size,
        "chunk_batches": CHUNK_BATCHES,
        "count": len(inputs.indices),
        "skip_corrupt": config.data_options.skip_corrupt,
        "refine": config.refine,
    }


def open_teacher(config: LabelConfig, inputs: Inputs, device, parts_dir, done, labeled):
    """The teacher that labels, its numerics resolved (``calibrate``), and how the labels
    are made: with labeled examples but no refinement the choice is made now.

    Returns:
        (teacher, the metadata of its parts, ``LabeledExamples`` or None, the allowed
        sources, whether to keep features).
    """
    from zmdevice.calibrate import calibrated_teacher

    # --precision / --runtime auto: measured on this run's first batches, or cached.
    teacher = calibrated_teacher(
        config, inputs.classes, device, inputs.dataset, inputs.indices, parts_dir, done
    )
    has_labeled = labeled is not None
    allowed = allowed_sources(
        teacher, config.teacher, has_labeled, config.refine, config.shard is not None
    )
    examples = LabeledExamples.of(teacher, labeled, inputs.classes) if has_labeled else None
    with_features = needs_features(config.refine, allowed)
    info = teacher.info
    if has_labeled and not with_features:
        teacher, info = choose_before_labeling(examples, allowed, teacher)
    return teacher, info, examples, allowed, with_features


def file_metadata(config, inputs: Inputs, teacher_info, top_k, settings, created) -> dict:
    """The pseudo-label metadata of every part (``pseudolabels.build_metadata``)."""
    classes, shard = inputs.classes, inputs.shard
    return build_metadata(
        classes=classes.names,
        teacher=teacher_info,
        data={
            "source": str(config.data),
            "modality": inputs.dataset.modality,
            "fingerprint": settings["fingerprint"],
            "count": len(inputs.dataset),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        },
        top_k=top_k,
        max_kl=DEFAULT_MAX_KL,
        mantissa_bits=DEFAULT_MANTISSA_BITS,
        prompts={n: classes.prompts.get(n, []) for n in classes.names},
        templates=config.templates,
        created=created,
    )


def _label_chunks(engine: Engine, job: ChunkJob, metadata: dict) -> int:
    """Label the chunks ``job`` has not finished through ``engine``; write each part file
    as its chunk comes back (its features first: a part on disk means they are too).

    Returns:
        How many samples were labeled now.
    """
    labeled = 0
    try:
        with contextlib.closing(engine.label_chunks(job)) as chunks:
            for chunk in chunks:
                if job.with_features:
                    write_part_features(job.parts_dir, chunk.number, chunk.features)
                write_part(
                    job.parts_dir, chunk.number, metadata, chunk.ids, chunk.probs,
                    chunk.skipped, chunk.stats,
                )  # fmt: skip
                labeled += len(chunk.ids)
    except BaseException:
        # Finished chunks stay for --resume; a run that finished none leaves nothing.
        if not finished_parts(job.parts_dir):
            shutil.rmtree(job.parts_dir, ignore_errors=True)
        raise
    return labeled


def write_output(run: Run) -> tuple[dict, list[str]]:
    """Join the parts into the output; with features, first make the chosen labels from the
    joined zero-shot ones, then write those. The gold report goes into the output.

    Returns:
        (the output's metadata, the gold report's summary lines).
    """
    job, inputs = run.job, run.inputs
    parts = [job.parts_dir / f"part-{j:06d}.parquet" for j in range(len(job.chunks))]
    if not job.with_features:
        quality, lines = _gold(run, job.teacher, lambda: labels_by_id(parts))
        update = {"quality": quality, "created": run.created}
        return combine_pseudolabels(parts, inputs.out, metadata_update=update), lines
    unrefined = job.parts_dir / "unrefined.parquet"
    combine_pseudolabels(
        parts, unrefined, metadata_update={"quality": None, "created": run.created}
    )
    zero_shot, features = read_parts_outputs(unrefined, parts)
    ids, probs, metadata, gold_teacher = labels_from_features(
        zero_shot, features, run.examples, run.allowed, inputs.class_prior, job.teacher
    )
    metadata["quality"], lines = _gold(
        run, gold_teacher, lambda: dict(zip(ids, probs.argmax(axis=1).tolist(), strict=True))
    )
    with PseudoLabelWriter(inputs.out, metadata) as writer:
        for start in range(0, len(ids), REFINE_WRITE_ROWS):
            stop = start + REFINE_WRITE_ROWS
            writer.write_probs(ids[start:stop], probs[start:stop])
    return read_pseudolabel_metadata(inputs.out), lines


def _gold(run: Run, teacher, known) -> tuple[dict | None, list[str]]:
    """The gold report of ``teacher`` (None and no lines without ``--gold``); ``known``
    gives the id -> class of what this run labeled."""
    gold = run.inputs.gold
    if gold is None:
        return None, []
    names = run.inputs.classes.names
    return gold.report(teacher, names, run.job.batch_size, run.job.workers, known())
