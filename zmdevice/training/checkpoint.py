"""Checkpoints that cannot run code: tensors in safetensors, everything else in JSON.

``checkpoints/last.json`` (the manifest, written last) names the tensor file
``checkpoints/last-<token>.safetensors`` and its sha256, and holds the counters, the plan's
settings, the data fingerprints and the JSON tree of the state; each tensor in the tree is
a reference ``{"__tensor__": key}`` into the tensor file. Both files are written through a
temporary file and a rename, the tensor file first, so a crash leaves the previous pair
intact. Nothing is ever unpickled: the pickle ``last.pt`` of earlier versions is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import secrets
from pathlib import Path

import numpy as np
import torch

from zmdevice.errors import UserError, atomic_path, disk_trouble, write_text_atomic
from zmdevice.training.average import restore_average
from zmdevice.training.loop import Setup, begin_stage, cpu_state

FOLDER = "checkpoints"
MANIFEST = f"{FOLDER}/last.json"
LEGACY_PICKLE = f"{FOLDER}/last.pt"
FORMAT, FORMAT_VERSION = "zmdevice-checkpoint", 2
MAY_CHANGE_ON_RESUME = {
    # Where the run writes and how fast it goes, not what it computes; the data files are
    # compared by content (fingerprints) instead of by path.
    "resume", "overwrite", "stop_after", "device", "threads", "out", "image_cache_gb",
    "labeled", "unlabeled", "pseudo_labels", "test", "gold_unlabeled",
    # Where the records are also sent (``--log``): a resumed run may add or change a tracker.
    "log",
}  # fmt: skip


# --------------------------------------------------------------------------- tree <-> JSON


def flatten(value, tensors: dict, key: str):
    """JSON-ready copy of ``value``; tensors and arrays move to ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(
            value.astype(np.int64 if value.dtype.kind == "u" else value.dtype)
        )
        return {"__array__": key, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if all(isinstance(name, str) for name in value):
            return {name: flatten(item, tensors, f"{key}/{name}") for name, item in value.items()}
        items = [
            [flatten(name, tensors, f"{key}/k{i}"), flatten(item, tensors, f"{key}/{i}")]
            for i, (name, item) in enumerate(value.items())
        ]
        return {"__items__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(item, tensors, f"{key}/{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(item, tensors, f"{key}/{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {key}")


def unflatten(value, tensors: dict):
    """Undo ``flatten``; a missing tensor raises KeyError."""
    if isinstance(value, list):
        return [unflatten(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__array__" in value:
        return tensors[value["__array__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(unflatten(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value["__items__"]}
    return {name: unflatten(item, tensors) for name, item in value.items()}


def settings_of(setup: Setup) -> dict:
    """The run's settings as JSON values (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(setup.config), default=str))


# --------------------------------------------------------------------------- save


def save(setup: Setup, state: dict) -> None:
    """Write everything needed to continue exactly (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    student = setup.student
    tree = {
        "stage_index": state["stage_index"],
        "step": state["step"],
        "global_step": state["global_step"],
        "kd_head": student.kd_head is not None,
        "model": cpu_state(student),
        "optimizer": state["optimizer"].state_dict() if state["optimizer"] else None,
        "scheduler": state["scheduler"].state_dict() if state["scheduler"] else None,
        "alignment": state["alignment"].state_dict() if state["alignment"] else None,
        "scaler": state["scaler"].state_dict(),
        "samplers": {name: sampler.state_dict() for name, sampler in state["samplers"].items()},
        "ahead": state["ahead"],
        "best": state["best"],
        "stage_summaries": state["stage_summaries"],
        "rng": rng_state(setup),
        "guard": state.get("guard"),
        "average": state["average"],
        "budget": setup.budget.record() if setup.budget is not None else None,
    }
    tensors: dict = {}
    flat = flatten(tree, tensors, "state")
    folder = setup.out / FOLDER
    name = f"last-{secrets.token_hex(4)}.safetensors"
    with atomic_path(folder / name) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as error:
            # Its I/O errors (a full disk) carry the system's code in the text only.
            code = disk_trouble(error)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(folder / name)) from error
        digest = file_sha256(tmp)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensors": name,
        "sha256": digest,
        "settings": settings_of(setup),
        "fingerprints": setup.fingerprints,
        "world_size": setup.ranks.world_size,
        "state": flat,
    }
    try:
        write_text_atomic(setup.out / MANIFEST, json.dumps(manifest))
    except BaseException:
        (folder / name).unlink(missing_ok=True)  # the previous pair stays whole
        raise
    for old in folder.glob("last-*.safetensors"):
        if old.name != name:
            old.unlink()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- load


def load(setup: Setup, state: dict) -> None:
    """Restore ``state`` (and the student, RNGs, text-view RNG) from ``out``'s checkpoint.

    Every problem is a one-line ``UserError``: no checkpoint, the old pickle format, a
    damaged or foreign file, or settings / data that differ from the checkpoint's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = setup.out / MANIFEST
    manifest = read_manifest(setup.out)
    check_same_run(setup, manifest, path)
    saved_world = manifest.get("world_size", 1)
    if saved_world != setup.ranks.world_size:
        raise UserError(
            f"--resume: {path} was written by a run on {saved_world} process(es), this one "
            f"has {setup.ranks.world_size}: resume with --nproc {saved_world}"
        )
    name = manifest.get("tensors")
    tensor_path = path.parent / str(name)
    if not isinstance(name, str) or Path(name).name != name or not tensor_path.is_file():
        raise UserError(f"--resume: {path} names a missing tensor file {name!r}; {FRESH}")
    if file_sha256(tensor_path) != manifest.get("sha256"):
        raise UserError(f"--resume: {tensor_path} is damaged (sha256 differs); {FRESH}")
    try:
        tree = unflatten(manifest["state"], load_file(str(tensor_path)))
        restore(setup, state, tree)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"--resume: {path} does not fit this run ({detail}); {FRESH}") from None


FRESH = "train again with --overwrite (or another --out)"


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        if (out / LEGACY_PICKLE).is_file():
            raise UserError(
                f"--resume: {out / LEGACY_PICKLE} is an old pickle checkpoint, which zmdevice "
                f"does not load (it could run code); {FRESH}"
            )
        raise UserError(f"--resume: no checkpoint at {path}; run without --resume")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"--resume: {path} is not a zmdevice checkpoint (damaged?); {FRESH}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"--resume: {path} has checkpoint format {manifest.get('format_version')!r}, this "
            f"zmdevice reads {FORMAT_VERSION}; {FRESH}"
        )
    return manifest


def check_same_run(setup: Setup, manifest: dict, path: Path) -> None:
    """UserError naming every setting and data set that differs from the checkpoint's."""
    saved, now = manifest.get("settings") or {}, settings_of(setup)
    differences = [
        f"{key} {now.get(key)!r} (checkpoint {saved.get(key)!r})"
        for key in sorted(set(saved) | set(now))
        if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != now.get(key)
    ]
    saved_prints = manifest.get("fingerprints") or {}
    differences += [
        f"{name} data (other content than the checkpoint's)"
        for name in sorted(set(saved_prints) | set(setup.fingerprints))
        if saved_prints.get(name) != setup.fingerprints.get(name)
    ]
    if differences:
        raise UserError(
            f"--resume: {path} belongs to a run with other settings: {'; '.join(differences)}; "
            "resume with the checkpoint's settings, or use another --out or --overwrite"
        )


def restore(setup: Setup, state: dict, tree: dict) -> None:
    """Rebuild the stage in progress, then load every saved state into it."""
    state["stage_index"], state["step"] = int(tree["stage_index"]), int(tree["step"])
    state["global_step"] = int(tree["global_step"])
    state["stage_summaries"] = tree["stage_summaries"]
    student = setup.student
    if tree["kd_head"]:
        student.attach_kd_head(seed=0)
    student.load_state_dict(tree["model"])
    student.to(setup.device)
    state["guard"] = tree.get("guard")  # before begin_stage: a ``distill`` stage is in it
    begin_stage(setup, state)
    if tree["optimizer"] is not None:
        state["optimizer"].load_state_dict(tree["optimizer"])
        state["scheduler"].load_state_dict(tree["scheduler"])
        match_parameter_layouts(state["optimizer"])
    if tree["alignment"] is not None:
        state["alignment"].load_state_dict(tree["alignment"])
    if tree.get("scaler"):  # empty when no loss scaling ran (fp32, bf16)
        state["scaler"].load_state_dict(tree["scaler"])
    for name, sampler_state in tree["samplers"].items():
        state["samplers"][name].load_state_dict(sampler_state)
    state["ahead"] = tree["ahead"]
    state["best"] = tree["best"]
    state["average"] = restore_average(tree.get("average"), student)
    set_rng_state(setup, tree["rng"])


def rng_state(setup: Setup) -> dict:
    """Every random generator a run draws from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "text": setup.data.views.rng.getstate() if setup.data.modality == "text" else None,
    }


def set_rng_state(setup: Setup, rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["text"] is not None:
        setup.data.views.rng.setstate(rng["text"])


def match_parameter_layouts(optimizer) -> None:
    """Give each moment tensor its parameter's memory layout (channels-last students).

    The tensor file holds contiguous copies; the fused AdamW kernel pairs a parameter and
    its moments element by element in memory, so their strides must agree again.
    """
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
