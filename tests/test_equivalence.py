"""Training and labeling produce the recorded reference's numbers, on every CPU kind.

The reference (``equivalence_reference.json``, written by ``make_equivalence_reference.py``)
holds, for tiny runs of every method and both tiny teachers, sha256 fingerprints of the
student weights, the metrics lines and the label files, and the numbers behind them. On the
machine kind it was recorded on (same torch build, CPU capability and vendor) every
fingerprint must be bit-identical: a refactoring that changes any of them changed behaviour.
Everywhere the numbers must also agree within tolerances that hold across CPU kinds, whose
kernels round differently, yet fail for a changed computation (the last test checks that).
Only another torch release skips: its kernels may compute differently.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from make_equivalence_reference import (
    REFERENCE,
    compute_fingerprints,
    environment,
    make_image_data,
    make_text_data,
    train_once,
)

# Measured on an AMD EPYC (AVX2, the reference's kind) against other kernels for every kind
# of float work: ATEN_CPU_CAPABILITY=default (ATen's kernels without AVX2),
# ONEDNN_MAX_CPU_ISA=SSE41 (convolutions), MKL_CBWR=COMPATIBLE (matrix products) and the
# three together. The largest differences over all runs, with what small real changes to
# the zeromatch runs do:
# - metrics lines (6 decimals in metrics.jsonl): 1e-6, one rounding step. One hyper-parameter
#   1% off (lr, head_lr, lambda_u, lambda_p) moves them 5e-5 to 1e-2; an extra step adds lines.
# - the student's weights, |change| / |weights| over all its float tensors: image 4.0e-5,
#   text 1.2e-7. The image share is BatchNorm's: biases whose gradient is rounding noise,
#   which AdamW turns into full steps, and running means of channels near zero. lr 1% off
#   moves image weights 6.8e-4 and text 3.2e-5, head_lr 1% off 1.2e-3 and 2.0e-4, one more
#   SSL step 8.0e-3 and 6.1e-4.
# - label probabilities: identical (float16 in the file; the smallest top-2 margin is 0.016).
# The tolerances are 5 to 8 times the measured differences; a change that only the
# bit-identical fingerprints see (weight decay 1% off) is the reference kind's to catch.
METRICS_ATOL = 5e-6
WEIGHTS_RTOL = {"image": 2e-4, "text": 1e-6}
"""Per modality (the first part of a run's name)."""
PROBS_FLOAT16_STEPS = 1
"""A teacher's probabilities whose last bits differ may round to the neighbouring float16."""


# Kernels of a lower instruction set, which a newer CPU also runs: ATen's own, and oneDNN's
# (the convolutions). Measured on an AMD EPYC with AVX-512: under AVX2's kernels every run
# is bit-identical to the reference recorded on an AVX2 EPYC; with its own kernels the image
# weights move up to 2.6e-5 of their norm, inside WEIGHTS_RTOL.
LOWER_KERNELS = {
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")
"""torch.backends.cpu.get_cpu_capability()'s values, oldest first, on x86."""


def release(version: str) -> str:
    """``2.14.1`` of ``2.14.1+cu130``: CPU builds and CUDA builds share their CPU kernels."""
    return version.split("+")[0]


def weights_change(reference: dict, measured: dict) -> float:
    """|change| / |weights| over the float tensors, from their norms and projections."""
    change = size = 0.0
    for name, numbers in reference.items():
        if isinstance(numbers[0], int):
            continue  # integer tensors are compared exactly
        change += sum((a - b) ** 2 for a, b in zip(numbers, measured[name], strict=True))
        size += numbers[0] ** 2
    return math.sqrt(change / size)


def value_differences(reference: dict, measured: dict) -> list[str]:
    """One line per run whose numbers differ beyond the cross-kind tolerances."""
    problems = []
    for run in sorted(reference):
        expected, got = reference[run], measured[run]
        if "probs" in expected:
            problems += label_differences(run, expected, got)
            continue
        if len(got["metrics"]) != len(expected["metrics"]):
            problems.append(
                f"{run}: {len(got['metrics'])} metrics lines, not {len(expected['metrics'])}"
            )
        for line, (want, have) in enumerate(zip(expected["metrics"], got["metrics"], strict=False)):
            if want.keys() != have.keys():
                problems.append(f"{run}: metrics line {line} has keys {sorted(have)}")
                continue
            for key, value in want.items():
                same = (
                    abs(value - have[key]) <= METRICS_ATOL
                    if isinstance(value, float) and isinstance(have[key], (int, float))
                    else value == have[key]
                )
                if not same:
                    problems.append(f"{run}: metrics line {line} {key} {have[key]}, not {value}")
        if expected["weights"].keys() != got["weights"].keys():
            problems.append(f"{run}: tensors {sorted(got['weights'])}")
            continue
        integers = [
            name
            for name, numbers in expected["weights"].items()
            if isinstance(numbers[0], int) and numbers != got["weights"][name]
        ]
        if integers:
            problems.append(f"{run}: integer tensors differ: {integers}")
        change = weights_change(expected["weights"], got["weights"])
        tolerance = WEIGHTS_RTOL[run.split("/")[0]]
        if change > tolerance:
            problems.append(f"{run}: weights moved {change:.1e} of their norm (> {tolerance})")
    return problems


def label_differences(run: str, expected: dict, got: dict) -> list[str]:
    if got["ids"] != expected["ids"] or got["label"] != expected["label"]:
        return [f"{run}: other ids or hard labels"]
    want, have = np.array(expected["probs"]), np.array(got["probs"])
    step = np.spacing(np.maximum(want, have).astype(np.float16)).astype(np.float64)
    if want.shape != have.shape or np.any(np.abs(want - have) > PROBS_FLOAT16_STEPS * step):
        return [f"{run}: probabilities differ by {np.abs(want - have).max():.1e}"]
    return []


def skip_reason(recorded: dict, here: dict) -> str | None:
    """Why the comparison cannot run here, or None: only another torch release."""
    if release(recorded["torch"]) != release(here["torch"]):
        return (
            f"reference recorded with torch {recorded['torch']}, this is {here['torch']}; "
            "regenerate it on the unchanged code to compare here"
        )
    return None


def test_only_another_torch_release_skips_the_comparison():
    recorded = json.loads(REFERENCE.read_text())["environment"]
    for capability in ("AVX2", "AVX512", "DEFAULT"):
        for vendor in ("AuthenticAMD", "GenuineIntel"):
            here = {**recorded, "cpu_capability": capability, "cpu_vendor": vendor}
            assert skip_reason(recorded, here) is None, here
    cpu_build = {**recorded, "torch": release(recorded["torch"]) + "+cpu"}
    assert skip_reason(recorded, cpu_build) is None
    assert "regenerate" in skip_reason(recorded, {**recorded, "torch": "9.0.0"})


@pytest.mark.usefixtures("one_thread")
def test_every_method_and_teacher_matches_the_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    recorded, here = reference["environment"], environment()
    reason = skip_reason(recorded, here)
    if reason is not None:
        pytest.skip(reason)
    measured = compute_fingerprints(tmp_path)
    assert sorted(measured["runs"]) == sorted(reference["runs"])
    differ = value_differences(reference["values"], measured["values"])
    assert not differ, "changed numbers:\n" + "\n".join(differ)
    if here == recorded:
        changed = [
            name for name in measured["runs"] if measured["runs"][name] != reference["runs"][name]
        ]
        assert not changed, (
            f"not bit-identical where the reference was recorded ({recorded}), though within "
            "the cross-kind tolerances: the computation changed slightly, or this machine's "
            f"math libraries round differently: {changed}"
        )


def forced_kernels_reason(recorded: dict, here: dict) -> str | None:
    """Why this machine cannot run the reference's own kernels, or None."""
    if here["cpu_capability"] not in CAPABILITY_ORDER:
        return f"a {here['cpu_capability']} CPU has no {recorded['cpu_capability']} kernels"
    if CAPABILITY_ORDER.index(here["cpu_capability"]) < CAPABILITY_ORDER.index(
        recorded["cpu_capability"]
    ):
        return f"this CPU lacks {recorded['cpu_capability']}, which the reference ran"
    if here["cpu_vendor"] != recorded["cpu_vendor"]:
        # MKL picks its matrix-product kernels by vendor too, whatever the instruction set.
        return f"reference recorded on {recorded['cpu_vendor']}, this is {here['cpu_vendor']}"
    return None


def test_the_reference_kernels_forced_here_give_the_same_bits(tmp_path):
    """On a newer CPU than the reference's, its lower kernels make the proof bit for bit."""
    reference = json.loads(REFERENCE.read_text())
    recorded, here = reference["environment"], environment()
    reason = skip_reason(recorded, here) or forced_kernels_reason(recorded, here)
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "fingerprints.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", **LOWER_KERNELS.get(recorded["cpu_capability"], {}))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    script = Path(__file__).with_name("make_equivalence_reference.py")
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, timeout=600)
    measured = json.loads(out.read_text())
    assert measured["environment"] == recorded
    changed = [
        name for name in reference["runs"] if measured["runs"][name] != reference["runs"][name]
    ]
    assert not changed, f"not bit-identical under the reference's own kernels: {changed}"


def test_a_cpu_without_the_reference_kernels_is_told_so():
    recorded = {"torch": "2.14.1", "cpu_capability": "AVX2", "cpu_vendor": "AuthenticAMD"}
    assert forced_kernels_reason(recorded, {**recorded, "cpu_capability": "AVX512"}) is None
    assert forced_kernels_reason(recorded, recorded) is None
    assert "lacks AVX2" in forced_kernels_reason(
        recorded, {**recorded, "cpu_capability": "DEFAULT"}
    )
    assert "GenuineIntel" in forced_kernels_reason(
        recorded, {**recorded, "cpu_capability": "AVX512", "cpu_vendor": "GenuineIntel"}
    )
    assert "no AVX2 kernels" in forced_kernels_reason(
        recorded, {**recorded, "cpu_capability": "NEON"}
    )


@pytest.mark.parametrize(
    ("modality", "changes"),
    [
        ("image", dict(steps={"ssl_steps": 5})),
        ("text", dict(extra={"lr": 1.01e-4})),  # the text default is 1e-4
        ("image", dict(extra={"lambda_p": 0.99})),
    ],
    ids=["one-more-step", "lr-1%-off", "lambda_p-1%-off"],
)
@pytest.mark.usefixtures("one_thread")
def test_a_changed_computation_fails_the_comparison(tmp_path, modality, changes):
    make = make_image_data if modality == "image" else make_text_data
    root = make(tmp_path / "data")
    with mock.patch("zmdevice.report.plot_curves", lambda *args, **kwargs: None):
        _, values = train_once(root, modality, tmp_path / "run", "zeromatch", 0, **changes)
    run = f"{modality}/zeromatch/0"
    reference = json.loads(REFERENCE.read_text())["values"]
    assert value_differences({run: reference[run]}, {run: values})
