"""``auto`` numerics by measurement: time the candidates on the run's own batches, keep the
fastest one that computes like fp32, and cache the decision.

Labeling (``calibrated_teacher``): the (runtime, precision) pairs the hardware supports
(``teacher_candidates``: torch fp32; torch bf16 on a CPU with bf16 instructions or a GPU
with bf16; torch fp16 on CUDA; onnx fp32 and, for sentence encoders, onnx int8 on a CPU)
each label up to ``CALIBRATION_BATCHES`` typical batches of the run
(``calibration_batches``), after one untimed warm-up batch, within ``BUDGET_SHARE`` of the
run's projected time and ``TIME_CAP_S`` seconds: an ONNX candidate whose export would not
fit is left out, and measured by a later run long enough to pay for it. A candidate passes
unless its argmax labels differ from torch fp32's on significantly more than
``1 - MIN_AGREEMENT`` of those samples (``below_bar_p``); the fastest that passes is kept.
A candidate stops early once it cannot win (``SLOWER_STOP``: too slow, or already below
the bar). ``--precision`` or ``--runtime`` given explicitly fix their axis: only the other
one is measured (nothing, when both are given).

Training (``zmdevice.training.calibration``) measures a few training steps the same way and
shares this module's cache and clock (``measure_call``).

The decision is cached as JSON in ``<cache folder>/calibration/<key>.json`` (the cache
folder of ``zmdevice.onnx_teacher.cache_root``): the key is a hash of the model (spec and
weight files), the device, the torch and onnxruntime versions, the CPU (model, flags,
threads), the candidates and the batch shape; the file repeats that identity, and a file
that does not parse or does not match is ignored with a note and measured again. Later runs
read it and start at once.

Where measuring is impossible or not worth it, the table of ``zmdevice.precision`` decides:
fewer than ``MIN_LABEL_BATCHES`` batches to label (or too few steps to train) and no cached
decision, the ray engine (its workers build their own teacher), ``--shard`` runs
(their files must join under one teacher record: they read a cached decision but never
measure), several training processes (each would measure its own), a resumed training run.
A resumed labeling run keeps the numerics its finished parts recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice import precision as numerics
from zmdevice.errors import UserError, write_text_atomic

CALIBRATION_BATCHES = 3
"""Timed batches per teacher candidate (after one untimed warm-up batch)."""
TIME_CAP_S = 6.0
"""Timed seconds of a teacher calibration in all, shared evenly by the candidates; a
candidate stops after its share, once it has timed one batch."""
MIN_AGREEMENT = 0.995
"""The bar: share of samples whose label equals torch fp32's that a teacher candidate must
keep. A few batches cannot show 99.5% (192 samples allow no disagreement at all), so a
candidate is rejected when its disagreements are too many to come from a candidate at the
bar (``below_bar_p`` < ``SIGNIFICANCE``): torch bf16 disagreed once in 192 samples on an
EPYC with avx512_bf16 (99.85% equal over 2,000 texts) and was rejected by the bare share;
MiniLM's int8 export disagreed 8 times in 192 (p = 1e-5) and still is."""
SIGNIFICANCE = 0.05
"""A candidate whose disagreements would be this unlikely at the bar is below it."""
SLOWER_STOP = 1.25
"""A candidate stops after a timed batch once it runs this much slower per sample than the
fastest one that passed before it (it cannot be chosen), or once its disagreements are
already below the bar: its remaining batches would only cost the run time. One batch's
timing varies by a few percent, far less than this margin."""
BUDGET_SHARE = 0.05
"""Measuring may cost at most this share of the run it serves, projected as the run's
samples x the fastest passing candidate's seconds per sample. Each candidate's timed
batches stop after ``1 / (2 x candidates)`` of that allowance (the other half: one warm-up
batch each, about as long); an ONNX candidate whose export is not cached yet is measured
only while the allowance left covers its export (``EXPORT_SECONDS_PER_MILLION``), else it
is recorded as not measured, and a later run long enough to pay for it measures again. On
an EPYC with avx512_bf16, 10,000 texts to MiniLM: a run of about 35 s, whose 5% at bf16's
measured speed (0.7 s) cannot pay for the 5.3 s of exporting and quantising."""
EXPORT_SECONDS_PER_MILLION = {"onnx": 0.17, "onnx-int8": 0.22}
"""Estimated seconds to export (``onnx``) and to quantise (``onnx-int8``) a teacher, per
million parameters: 1.5x what one core of an EPYC (Zen 4) took, MiniLM (22.7M parameters)
2.02 s and 3.31 s, EfficientNet-Lite0 (4.7M) 0.53 s. Per forward pass the two differ
16-fold (a batch of 64 costs MiniLM 0.31 s, EfficientNet-Lite0 1.41 s); per parameter
they agree within 25%."""
MIN_LABEL_BATCHES = 100
"""Batches a run must label to measure: calibration runs up to 5 candidates x 4 batches, and
a shorter run would spend more on measuring than it can gain."""
CACHE_VERSION = 2
"""2: the agreement rule became a test against the bar (``below_bar_p``); decisions cached
under the bare share are measured again."""

Timer = Callable[[str, Callable[[], Any]], tuple[float, Any]]
"""(candidate name, call) -> (seconds the call took, what it returned); tests fake it."""


def measure_call(name: str, call: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of ``call()`` and its result. The calls end on a host copy (the
    probabilities, a loss as a float), so a GPU has finished its work when the clock stops."""
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


@dataclass(frozen=True)
class Candidate:
    """One way to run a teacher's network."""

    runtime: str
    """"torch", "onnx" or "onnx-int8"."""
    precision: str
    """"fp32", "bf16" or "fp16" (the onnx runtimes: fp32)."""

    @property
    def name(self) -> str:
        return self.runtime if self.runtime == "onnx-int8" else f"{self.runtime}-{self.precision}"


REFERENCE = Candidate("torch", "fp32")
"""What every candidate is compared with, and the speed ratios are relative to."""


def has_bf16(hardware: numerics.Hardware) -> bool:
    """The device computes bf16 natively (a CPU with bf16 instructions, a GPU with bf16)."""
    kind = hardware.device_type
    return (kind == "cpu" and hardware.cpu_bf16) or (kind == "cuda" and hardware.cuda_bf16)


def teacher_candidates(
    precision: str, runtime: str, hardware: numerics.Hardware, kind: str
) -> list[Candidate]:
    """The candidates this hardware supports for a teacher of ``kind``, torch fp32 first,
    restricted to the explicit ``--precision`` / ``--runtime`` (``auto``: any). The ONNX
    ones are those the kind's class declares (``runtimes()``)."""
    import importlib.util

    from zmdevice.teachers import teacher_class

    precisions = ["fp32"] + ["bf16"] * has_bf16(hardware)
    if hardware.device_type == "cuda":
        precisions.append("fp16")
    found = [Candidate("torch", p) for p in precisions]
    onnx_there = importlib.util.find_spec("onnxruntime") is not None
    if hardware.device_type == "cpu" and onnx_there:
        found += [Candidate(r, "fp32") for r in teacher_class(kind).runtimes() if r != "torch"]
    return [
        c for c in found if precision in ("auto", c.precision) and runtime in ("auto", c.runtime)
    ]


# ----------------------------------------------------------------------------- the cache


def machine_identity(device) -> dict:
    """What makes one candidate faster than another besides the model: device, library
    versions, CPU model and flags, threads."""
    import importlib.metadata

    import torch

    device = torch.device(device)
    try:
        onnxruntime = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        onnxruntime = None
    flags = " ".join(sorted(numerics.cpu_flags()))
    identity = {
        "device": device.type,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime,
        "cpu": numerics.cpu_model(),
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "cpu_bf16": list(numerics.cpu_bf16_flags()),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
        identity["capability"] = list(torch.cuda.get_device_capability(device))
    return identity


def spec_files(rest: str) -> list:
    """(name, size, mtime) of every local file or folder a teacher spec names (weights, a
    class map), so that new weights are a new cache entry."""
    from zmdevice.onnx_teacher import files_fingerprint

    found = []
    for part in rest.split(":"):
        value = part.partition("=")[2] if "=" in part else part
        path = Path(value).expanduser()
        if value and path.exists():
            found.append([value, [list(f) for f in files_fingerprint(path)]])
    return found


def cache_path(identity: dict) -> Path:
    from zmdevice.onnx_teacher import cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "calibration" / f"{key}.json"


def read_decision(path: Path, identity: dict, names: list[str], fields: tuple) -> dict | None:
    """The cached decision for ``identity`` (None when there is none). A file that does not
    parse, was made for another identity, chose none of ``names`` or lacks a number of
    ``fields`` for a candidate that ran is ignored with a note: the caller measures again
    and replaces it."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("identity") != identity:
            raise ValueError("made for another model or machine")
        candidates = data.get("candidates")
        if not isinstance(candidates, dict) or data.get("chosen") not in names:
            raise ValueError("no valid choice in it")
        chosen = candidates.get(data["chosen"])
        if not isinstance(chosen, dict) or not all(_is_number(chosen.get(f)) for f in fields):
            raise ValueError("no measurement of its choice")
        if not all(
            isinstance(result, dict)
            and (
                "error" in result
                or "skipped" in result
                or all(_is_number(result.get(f)) for f in fields)
            )
            for result in candidates.values()
        ):
            raise ValueError("malformed candidates")
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:100]
        print(f"note: ignoring the calibration cache {path} ({reason}); measuring again",
              file=sys.stderr)  # fmt: skip
        return None
    measured_on = {"samples": data["samples"]} if _is_number(data.get("samples")) else {}
    return {"chosen": data["chosen"], "candidates": candidates, **measured_on}


def write_decision(path: Path, identity: dict, decision: dict) -> None:
    """Cache ``decision`` ({"chosen", "candidates"}) atomically; a cache folder that cannot
    be written costs the next run a measurement, not this run."""
    import datetime

    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {"version": CACHE_VERSION, "identity": identity, **decision, "created": created}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))
    except OSError as error:
        print(f"note: cannot cache the calibration in {path} ({error.strerror})",
              file=sys.stderr)  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def normalised(identity: dict) -> dict:
    """``identity`` as it reads back from JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(identity, default=str))


# ----------------------------------------------------------------------------- teachers


def calibrated_teacher(
    config, classes, device, dataset, indices, parts_dir: Path, done: set, timer=None
):
    """The teacher of a labeling run (``zmdevice.label``), its numerics resolved: forced by
    the flags, kept from the finished parts of a resumed run, read from the cache, measured
    on the first batches of ``indices`` (see the module doc), or from the table.

    Args:
        config: the run's ``LabelConfig``.
        classes: its ``ClassList``.
        device: the torch device the teacher runs on.
        dataset, indices: the data and the samples this run labels, in order.
        parts_dir, done: the parts folder and the chunks an interrupted run finished.
        timer: a :data:`Timer` (default: the wall clock).

    Returns:
        The teacher; its ``info["calibration"]`` records a measured or cached decision.
    """
    import functools

    import torch

    from zmdevice.teachers import build_teacher, resolve_spec

    build = functools.partial(
        build_teacher, config.teacher, classes, device=device, templates=config.templates
    )
    flags = {"precision": config.precision, "runtime": config.runtime}
    if config.engine == "ray":
        return build(**flags)
    kind, rest, entry = resolve_spec(config.teacher)
    if done:
        return _resumed_teacher(build, flags, kind, parts_dir, done, torch.device(device))
    hardware = numerics.Hardware.probe(device)
    candidates = teacher_candidates(config.precision, config.runtime, hardware, kind)
    if len(candidates) < 2:
        return build(**flags)
    identity = normalised(
        {
            "what": "teacher",
            "version": CACHE_VERSION,
            "spec": f"{kind}:{rest}",
            "catalog": {k: v for k, v in entry.items() if k != "weights_from"},
            "files": spec_files(rest),
            **machine_identity(device),
            "candidates": [c.name for c in candidates],
            "batch_size": config.batch_size,
        }
    )
    path = cache_path(identity)
    names = [c.name for c in candidates]
    decision = read_decision(path, identity, names, ("speedup", "agreement", "seconds_per_sample"))
    cached = decision is not None
    too_small = len(indices) < MIN_LABEL_BATCHES * config.batch_size
    if not cached and (config.shard is not None or too_small):
        return build(**flags)
    reference = build(precision="fp32", runtime="torch")
    if cached and affordable_now(reference, candidates, decision, len(indices)):
        print("note: this run is long enough to measure the teacher candidates an earlier, "
              "shorter run left out; calibrating again", file=sys.stderr)  # fmt: skip
        decision, cached = None, False
    if not cached:
        started = time.perf_counter()
        batches = calibration_batches(dataset, reference, indices, config.batch_size)
        if not batches:
            return build(**flags)
        print(
            f"calibrating the teacher's runtime on {len(batches)} batches: "
            f"{', '.join(names)} (once for this model and machine; cached in {path.parent})",
            file=sys.stderr,
        )
        measure = timer or measure_call
        decision = measure_teacher(reference, candidates, batches, measure, len(indices))
        decision["seconds"] = round(time.perf_counter() - started, 3)  # exports included
        decision["samples"] = len(indices)  # the run it was planned for
        write_decision(path, identity, decision)
    chosen = next(c for c in candidates if c.name == decision["chosen"])
    record = {**decision, "cached": cached, "min_agreement": MIN_AGREEMENT}
    precision = numerics.Precision(chosen.precision, hardware.device_type, _reason(record))
    return reference.with_numerics(precision, chosen.runtime, {"calibration": record})


def _resumed_teacher(build, flags: dict, kind: str, parts_dir: Path, done: set, device):
    """The teacher of a resumed run, at the precision and runtime the finished parts record
    (their reason and calibration too, so every part carries the same teacher record). An
    explicit flag that differs builds the teacher it asks for: ``check_same_numerics`` then
    refuses the mix.

    Raises:
        UserError: the recorded numerics cannot run on ``device`` (onnx parts resumed on a
            GPU, fp16 parts on a CPU), naming the flag that would.
    """
    from zmdevice.labeling.parts import finished_parts
    from zmdevice.pseudolabels import read_pseudolabel_metadata
    from zmdevice.teachers import teacher_class

    before = read_pseudolabel_metadata(finished_parts(parts_dir)[min(done)])["teacher"]
    recorded = {"precision": before.get("precision", "fp32"),
                "runtime": before.get("runtime", "torch")}  # fmt: skip
    if any(flags[k] not in ("auto", recorded[k]) for k in recorded):
        return build(**flags)
    # The same checks as these values given as flags (both raise the flag's error).
    cls = teacher_class(kind)
    hardware = numerics.Hardware(device.type)
    numerics.choose_runtime(recorded["runtime"], hardware, cls, recorded["precision"])
    if recorded["runtime"] == "torch":
        numerics.choose_precision(recorded["precision"], hardware, "")
    reason = before.get("precision_reason", "the interrupted run's")
    precision = numerics.Precision(recorded["precision"], device.type, reason)
    record = {"calibration": before["calibration"]} if "calibration" in before else None
    return build(precision="fp32", runtime="torch").with_numerics(
        precision, recorded["runtime"], record
    )


def calibration_batches(dataset, teacher, indices, batch_size: int) -> list:
    """Up to ``CALIBRATION_BATCHES`` collated batches of the run's own samples, as the run
    batches them: texts from the first chunk in its labeling order (shortest first, so a
    batch pads to similar lengths), the batches spread over it so their lengths are the
    run's typical ones, not its shortest or the data order's padded ones; images, the first
    readable ones (unreadable images skipped, as the run skips them). [] when not one full
    batch is readable."""
    from zmdevice.images import CorruptImage
    from zmdevice.labeling.batches import labeling_order
    from zmdevice.labeling.run import CHUNK_BATCHES

    if dataset.modality == "text":
        order = labeling_order(dataset, indices[: batch_size * CHUNK_BATCHES], teacher)
        count = min(CALIBRATION_BATCHES, len(order) // batch_size)
        gap = len(order) // max(count, 1)  # count evenly spaced batches, each mid-interval
        starts = [k * gap + (gap - batch_size) // 2 for k in range(count)]
        return [
            teacher.collate([teacher.prepare(dataset.texts[i]) for i in order[s : s + batch_size]])
            for s in starts
        ]
    batches, items = [], []
    for index in indices:
        try:
            raw = dataset.load_image(index)
        except CorruptImage:
            continue
        items.append(teacher.prepare(raw))
        if len(items) == batch_size:
            batches.append(teacher.collate(items))
            items = []
            if len(batches) == CALIBRATION_BATCHES:
                break
    return batches


def measure_teacher(
    reference, candidates: list[Candidate], batches: list, timer: Timer, samples: int
) -> dict:
    """Time each candidate on ``batches`` and compare its labels with torch fp32's, within
    ``BUDGET_SHARE`` of the run's projected time.

    Args:
        reference: the teacher at torch fp32 (``candidates[0]``).
        candidates: what to measure, ``REFERENCE`` first.
        batches: collated batches of the run's data.
        timer: see :data:`Timer`.
        samples: how many samples the run labels (what the allowance is a share of).

    Returns:
        {"chosen": the fastest name that passes, "candidates": {name: {"seconds_per_sample",
        "speedup" (vs torch fp32), "agreement" (share of equal labels), "max_abs_prob_diff",
        "samples", "passed", and "stopped" (why, when it stopped early)}, {"error": why it
        could not run} or {"skipped": why it was not measured}}}.
    """
    assert candidates[0] == REFERENCE
    results: dict[str, dict] = {}
    expected = None
    fastest = math.inf  # seconds per sample of the fastest candidate that passed so far
    # Seconds measuring so far, as planned: the estimated exports, the timed batches and a
    # warm-up as long as the first of them (a plan the fake timers of the tests can follow).
    spent = 0.0

    def allowance(seconds_per_sample: float) -> float:
        return BUDGET_SHARE * samples * min(fastest, seconds_per_sample)

    for candidate in candidates:
        teacher = reference
        export = export_seconds(reference, candidate)
        if export and spent + export > allowance(math.inf):
            results[candidate.name] = {"skipped": (
                f"its export (about {export:.1f} s) would take measuring past "
                f"{100 * BUDGET_SHARE:g}% of this run ({allowance(math.inf):.1f} s)"
            )}  # fmt: skip
            continue
        spent += export
        if candidate != REFERENCE:
            precision = numerics.Precision(candidate.precision, reference.device.type, "")
            try:
                teacher = reference.with_numerics(precision, candidate.runtime)
            except UserError as error:  # an export that fails or disagrees: not a candidate
                results[candidate.name] = {"error": str(error)}
                continue
        teacher.predict_proba(batches[0])  # warm-up: first-call allocations, not timed
        seconds, outputs, stopped = 0.0, [], None
        for batch in batches[: len(batches) if expected is None else len(expected)]:
            elapsed, probs = timer(
                candidate.name, lambda teacher=teacher, batch=batch: teacher.predict_proba(batch)
            )
            seconds += elapsed
            outputs.append(np.asarray(probs, dtype=np.float32))
            share = min(TIME_CAP_S, allowance(seconds / sum(map(len, outputs))))
            if seconds >= share / (2 * len(candidates)):
                break
            if expected is not None:
                stopped = hopeless(outputs, expected, seconds, fastest)
                if stopped:
                    break
        spent += seconds + seconds / len(outputs)
        if expected is None:
            expected = outputs  # torch fp32's, on as many batches as its share allowed
        probs, want = np.concatenate(outputs), np.concatenate(expected[: len(outputs)])
        equal = probs.argmax(1) == want.argmax(1)
        p_value = below_bar_p(int((~equal).sum()), len(equal))
        results[candidate.name] = {
            "seconds_per_sample": seconds / len(probs),
            "agreement": float(equal.mean()),
            "below_bar_p": p_value,
            "max_abs_prob_diff": float(np.abs(probs - want).max()),
            "samples": len(probs),
            "passed": p_value >= SIGNIFICANCE,
            **({"stopped": stopped} if stopped else {}),
        }
        if results[candidate.name]["passed"]:
            fastest = min(fastest, seconds / len(probs))
    base = results[REFERENCE.name]["seconds_per_sample"]
    for result in results.values():
        if "seconds_per_sample" in result:
            result["speedup"] = base / max(result["seconds_per_sample"], 1e-12)
    passed = [n for n, r in results.items() if r.get("passed")]
    chosen = min(passed, key=lambda n: results[n]["seconds_per_sample"])
    return {"chosen": chosen, "candidates": results}


def export_seconds(reference, candidate: Candidate) -> float:
    """The estimated seconds of the exports ``candidate`` needs and the cache lacks (0 for
    a torch candidate or a cached export): ``EXPORT_SECONDS_PER_MILLION`` per parameter."""
    network = reference.network
    if candidate.runtime == "torch" or network is None:
        return 0.0
    millions = sum(p.numel() for p in network.module.parameters()) / 1e6
    missing = network.missing_exports(candidate.runtime)
    return millions * sum(EXPORT_SECONDS_PER_MILLION[r] for r in missing)


def affordable_now(reference, candidates: list[Candidate], decision: dict, samples: int) -> bool:
    """Whether a run of ``samples`` can pay for a candidate that the cached ``decision``
    skipped: its export, after measuring again what the decision measured (each timed
    batch counted twice, for its warm-up), within ``BUDGET_SHARE`` of the run's time at the
    chosen candidate's speed (as ``measure_teacher`` decides). Only a run longer than the
    one the decision was planned for measures again, so runs of one size never repeat it."""
    if samples <= decision.get("samples", 0):
        return False
    results = decision["candidates"]
    allowance = BUDGET_SHARE * samples * results[decision["chosen"]]["seconds_per_sample"]
    measured = [r for r in results.values() if "seconds_per_sample" in r]
    again = sum(2 * r["seconds_per_sample"] * r.get("samples", 0) for r in measured)
    return any(
        "skipped" in results.get(c.name, {}) and again + export_seconds(reference, c) <= allowance
        for c in candidates
    )


def hopeless(outputs: list, expected: list, seconds: float, fastest: float) -> str | None:
    """Why a candidate need not run its remaining batches (``SLOWER_STOP``), or None."""
    samples = sum(len(o) for o in outputs)
    if seconds / samples > SLOWER_STOP * fastest:
        return f"after {samples} samples: over {SLOWER_STOP:g}x the time of a candidate that passed"
    labels = np.concatenate(outputs).argmax(1)
    disagreements = int((labels != np.concatenate(expected)[:samples].argmax(1)).sum())
    # Tested as if every sample still to come agreed: it fails whatever they show (testing
    # the samples so far would reject more often than the test at the end does).
    if below_bar_p(disagreements, sum(len(e) for e in expected)) < SIGNIFICANCE:
        return f"after {samples} samples: {disagreements} labels off, below the bar already"
    return None


def below_bar_p(disagreements: int, samples: int) -> float:
    """P(at least ``disagreements`` of ``samples`` labels differ) for a candidate that
    differs on exactly ``1 - MIN_AGREEMENT`` of them (the binomial upper tail)."""
    from zmdevice.metrics import binomial_tail

    return binomial_tail(disagreements, samples, 1.0 - MIN_AGREEMENT)


def _reason(record: dict) -> str:
    chosen = record["candidates"][record["chosen"]]
    how = "cached measurement" if record["cached"] else "measured"
    return (
        f"auto, {how}: {record['chosen']} ran {chosen['speedup']:.2f}x torch-fp32 with "
        f"{100 * chosen['agreement']:.2f}% of labels equal"
    )


def calibration_line(record: dict | None) -> str | None:
    """One summary line of a teacher's ``info["calibration"]`` (None without one)."""
    if not record:
        return None
    others, skipped = [], []
    for name, result in record["candidates"].items():
        if name == record["chosen"]:
            continue
        if "error" in result:
            others.append(f"{name} failed")
            continue
        if "skipped" in result:
            skipped.append(name)
            continue
        note = "" if result.get("passed") else ", rejected"
        agreement = 100 * result["agreement"]
        others.append(f"{name} {result['speedup']:.2f}x ({agreement:.2f}% equal{note})")
    if skipped:
        others.append(f"not measured: {', '.join(skipped)} (exporting would cost over "
                      f"{100 * BUDGET_SHARE:g}% of the run; a longer run measures it)")  # fmt: skip
    chosen = record["candidates"][record["chosen"]]
    cached = " (cached)" if record["cached"] else ""
    if "seconds" in record:  # what this run spent measuring, exports included
        cached = f" in {record['seconds']:.1f} s"
    return (
        f"  teacher numerics measured{cached}: {record['chosen']} chosen, "
        f"{chosen['speedup']:.2f}x torch-fp32; " + (", ".join(others) or "no other candidate")
    )
