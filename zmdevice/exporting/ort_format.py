"""ONNX Runtime's mobile format beside exported models: ``NAME.ort`` files checked against
their ``.onnx`` logits, and the operator list a reduced-size onnxruntime build needs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from zmdevice.errors import atomic_path
from zmdevice.exporting.onnx_file import ExportError
from zmdevice.exporting.parity import PARITY_TOLERANCE, SYNTHETIC_TEXTS

OPERATORS_SUFFIX = ".required_operators.config"


def operators_config_path(fp32_path: Path) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.required_operators.config``."""
    return fp32_path.with_name(fp32_path.stem + OPERATORS_SUFFIX)


def write_ort(onnx_paths: list[Path], examples: list | None = None) -> dict:
    """Write ONNX Runtime's mobile format beside exported models, checked against them.

    ``NAME.onnx`` -> ``NAME.ort`` (and ``NAME.int8.onnx`` -> ``NAME.int8.ort``), converted by
    ``onnxruntime.tools.convert_onnx_models_to_ort`` with the 'Fixed' optimisation style for
    an ARM target (phones; x86 kernels such as NCHWc are not baked in), plus one
    ``NAME.required_operators.config`` listing the operators of all of them: the
    ``--include_ops_by_config`` input of a reduced-size onnxruntime build. The metadata
    travels inside the .ort file. Each .ort file must reproduce its .onnx logits on
    ``examples`` (PIL images or strings; synthetic inputs when None) to PARITY_TOLERANCE.

    Returns:
        ``{"files": [.ort paths], "operators_config", "relative_errors": {name: error}}``.
    """
    onnx_paths = [Path(p) for p in onnx_paths]
    first = onnx_paths[0]
    work = first.parent / f".{first.stem}.ort.work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    try:
        converted = _convert(onnx_paths, work)
        errors = {}
        for path in onnx_paths:
            name = path.with_suffix(".ort").name
            errors[name] = _ort_relative_error(path, converted / name, examples)
        targets = []
        for path in onnx_paths:
            target = path.with_suffix(".ort")
            with atomic_path(target) as tmp:
                shutil.copyfile(converted / target.name, tmp)
            targets.append(target)
        config_path = operators_config_path(first)
        _write_operators_config(converted / "required_operators.config", targets, config_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "files": [str(t) for t in targets],
        "operators_config": str(config_path),
        "relative_errors": errors,
    }


def _convert(onnx_paths: list[Path], work: Path) -> Path:
    """Copies of ``onnx_paths`` in ``work/models`` converted into ``work/out``, returned."""
    import subprocess
    import sys

    for path in onnx_paths:
        shutil.copyfile(path, work / "models" / path.name)
    command = [
        sys.executable,
        "-m",
        "onnxruntime.tools.convert_onnx_models_to_ort",
        str(work / "models"),
        "--output_dir",
        str(work / "out"),
        "--optimization_style",
        "Fixed",
        "--target_platform",
        "arm",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ExportError(f"ORT format conversion failed: {lines[-1][:300]}")
    return work / "out"


def _write_operators_config(generated: Path, targets: list[Path], config_path: Path) -> None:
    """The converter's operator list, its header naming the shipped ``targets``."""
    # The generated comment names the work folder; name the shipped files instead.
    operators = generated.read_text(encoding="utf-8")
    header = "# Generated from model/s:\n" + "".join(f"# - {t.name}\n" for t in targets)
    body = "".join(line + "\n" for line in operators.splitlines() if not line.startswith("#"))
    with atomic_path(config_path) as tmp:
        tmp.write_text(header + body, encoding="utf-8")


def _ort_relative_error(onnx_path: Path, ort_path: Path, examples: list | None) -> float:
    """Max |ort - onnx| logit over max |onnx logit|; ExportError above PARITY_TOLERANCE."""
    import onnxruntime as ort

    from zmdevice.runtime import OnnxClassifier

    reference = OnnxClassifier(onnx_path)
    feed = _reference_feed(reference, examples)
    expected = reference.logits(feed)
    converted = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    if (
        dict(converted.get_modelmeta().custom_metadata_map)
        != reference.session.get_modelmeta().custom_metadata_map
    ):
        raise ExportError(f"{ort_path.name} lost the zmdevice metadata of {onnx_path.name}")
    got = converted.run(["logits"], feed)[0]
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(got - expected).max()) / scale
    if error > PARITY_TOLERANCE:
        raise ExportError(
            f"{ort_path.name}: the ORT format model differs from {onnx_path.name} by "
            f"{error:.1e} of the logit scale (limit {PARITY_TOLERANCE:.0e})"
        )
    return error


def _reference_feed(reference, examples: list | None) -> dict[str, np.ndarray]:
    """The inputs both files are run on: ``examples`` encoded by the .onnx file's own
    preprocessing, else ``SYNTHETIC_TEXTS`` or 4 random-normal image tensors."""
    if examples:
        if reference.modality == "text":
            return reference.encode_texts(examples)
        return reference.encode_images(examples)
    if reference.modality == "text":
        return reference.encode_texts(list(SYNTHETIC_TEXTS))
    size = int(reference.preprocess["image_size"])
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.normal(size=(4, 3, size, size)).astype(np.float32)}
