"""A trained student's folder: ``student.safetensors`` (main head only), ``config.json``
(format, preset, classes, architecture, preprocessing) and, for text, ``tokenizer.json``;
written atomically and rebuilt from ``config.json`` alone (no catalog, no initial weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zmdevice import __version__
from zmdevice.errors import UserError, atomic_path, write_text_atomic
from zmdevice.students.base import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from zmdevice.students.registry import FAMILIES


def save_student(student, out_dir: str | Path) -> Path:
    """Write ``student.safetensors`` (main head only), ``config.json``, ``tokenizer.json``.

    Every file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file; the weights are renamed last-but-one and the config last,
    so a folder with a config.json always has matching weights.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in student.state_dict().items()
        if not name.startswith("kd_head.")
    }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zmdevice_version": __version__,
        **student.config,
    }
    if student.modality == "text":
        # The runtime reads the same file: truncation travels with it, padding is per batch.
        student.tokenizer.no_padding()
        student.tokenizer.enable_truncation(max_length=student.max_length)
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            student.tokenizer.save(str(tmp))
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def read_student_config(model_dir: str | Path) -> dict:
    """The validated ``config.json`` of a trained student folder (no torch needed)."""
    model_dir = Path(model_dir)
    hint = "train one with `zmdevice train` or point to the folder it wrote"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder: {hint}")
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{model_dir} is not a trained student (no {CONFIG_FILE}): {hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path} is not valid JSON ({error}): {hint}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{model_dir} is not a trained zmdevice student ({CONFIG_FILE}): {hint}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{config_path} has student format version {version}; this zmdevice reads up to "
            f"{FORMAT_VERSION}: upgrade zmdevice"
        )
    for key in ("modality", "classes", "architecture", "preprocess"):
        if key not in config:
            raise UserError(f"{config_path} lacks '{key}': the folder is damaged, retrain")
    return config


def load_student(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a trained student folder written by ``save_student`` (eval mode).

    The module is rebuilt from ``config.json`` alone (no catalog, no initial weights), then
    the saved weights are loaded; the result has no KD head.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_student_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{model_dir} is not a trained student (no {WEIGHTS_FILE})")
    config = json.loads(json.dumps(config))  # private copy
    for key in ("format", "format_version", "zmdevice_version"):
        config.pop(key, None)
    family = FAMILIES.get(config["architecture"].get("family"))
    if family is None or family.modality != config["modality"]:
        raise UserError(
            f"{model_dir}/{CONFIG_FILE}: unknown student family "
            f"{config['architecture'].get('family')!r} for modality {config['modality']!r}"
        )
    with torch.random.fork_rng(devices=[]):
        student = family.from_config(config, model_dir)
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise UserError(f"cannot read {weights_path} ({error}): the file is damaged") from None
    expected = student.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(
            f"{weights_path} does not match {CONFIG_FILE} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} reshaped tensors): the folder is "
            "damaged, retrain"
        )
    student.load_state_dict(state)
    return student.to(device).eval()
