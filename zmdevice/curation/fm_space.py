"""The FM's view of a data set and of the labeled examples, for `suggest` and `check`.

A pseudo-label file stores the FM's probabilities, not its features. ``fm_outputs`` runs the
teacher named in the file's metadata once (``fewshot.teacher_outputs``: features and
zero-shot probabilities from one pass) and caches the result as float16 ``.npy`` files under
``onnx_teacher.cache_root() / "features"``, keyed by the data's fingerprint, the teacher spec
and the sample count (the probabilities also by the classes and prompts), so a second call
reads two small files. A teacher without a feature space (clip, nli, llm) gives the square
roots of its probabilities instead (unit vectors whose dot product is the Bhattacharyya
coefficient): coverage and the probe then work on what the FM believes, not on what it sees.

``load_space`` joins it all by id: the data, its pseudo-labels, the unit feature rows, the
labeled examples with their class ids, features and FM probabilities (taken from the data's
rows for labeled ids that the data holds; the teacher runs only on the others).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice.errors import UserError, atomic_path

CACHE_FOLDER = "features"
"""Sub-folder of the zmdevice cache holding the cached FM outputs."""


def cache_dir() -> Path:
    """Where cached FM features and probabilities live."""
    from zmdevice.onnx_teacher import cache_root

    return cache_root() / CACHE_FOLDER


def cache_key(fingerprint: str, spec: str, count: int, extra: Any = None) -> str:
    """32 hex digits naming one data set's outputs of one teacher (``extra``: whatever
    else they depend on, e.g. the classes for probabilities)."""
    identity = json.dumps([fingerprint, spec, int(count), extra], sort_keys=True)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def _read_cached(path: Path, rows: int) -> np.ndarray | None:
    """The cached float array at ``path`` with ``rows`` rows, or None (absent or damaged:
    recomputed then)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.ndim != 2 or len(array) != rows:
        return None
    return array.astype(np.float32)


def _write_cached(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array, dtype=np.float16), allow_pickle=False)


def has_features(spec: str) -> bool:
    """Whether the teacher kind of ``spec`` has a feature space (no model is built)."""
    from zmdevice.teachers import resolve_spec, teacher_class

    return teacher_class(resolve_spec(spec)[0]).features_and_probs is not None


def fm_outputs(
    dataset,
    spec: str,
    classes,
    *,
    probs: bool = True,
    templates: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The FM's features and zero-shot probabilities of every sample, cached.

    Args:
        dataset: a ``zmdevice.data`` data set of the teacher's modality.
        spec: the teacher (catalog name or kind:spec), e.g. the label file's
            ``metadata["teacher"]["spec"]``.
        classes: the ``ClassList`` the probabilities are over.
        probs: also return the probabilities (else None for them).
        templates: CLIP prompt templates (the label file's).
        device: where the teacher runs on a cache miss.
        batch_size: teacher batch size on a cache miss.

    Returns:
        (float32 [N, D] features or None for a teacher without a feature space,
        float32 [N, C] probabilities or None), in dataset order.
    """
    fingerprint, count = dataset.fingerprint(), len(dataset)
    root = cache_dir()
    featured = has_features(spec)
    feature_path = root / f"{cache_key(fingerprint, spec, count)}.features.npy"
    prompts = [classes.names, [classes.prompts.get(n, []) for n in classes.names], templates]
    probs_path = root / f"{cache_key(fingerprint, spec, count, prompts)}.probs.npy"
    features = _read_cached(feature_path, count) if featured else None
    probabilities = _read_cached(probs_path, count) if probs else None
    if (features is not None or not featured) and (probabilities is not None or not probs):
        return features, probabilities
    teacher = _build(spec, classes, templates, device)
    if featured:
        from zmdevice.fewshot import teacher_outputs

        order = None
        if dataset.modality == "text":  # similar lengths share a batch: less padding
            order = np.argsort([len(t) for t in dataset.texts], kind="stable")
        features, probabilities = teacher_outputs(teacher, dataset, batch_size, order=order)
        _write_cached(feature_path, features)
    else:
        probabilities = _predict(teacher, dataset, batch_size)
    _write_cached(probs_path, probabilities)
    return features, (probabilities.astype(np.float32) if probs else None)


def _build(spec: str, classes, templates: str | None, device: str):
    from zmdevice.device import resolve_device
    from zmdevice.teachers import build_teacher

    return build_teacher(spec, classes, device=resolve_device(device), templates=templates)


def _predict(teacher, dataset, batch_size: int) -> np.ndarray:
    """Zero-shot probabilities [N, C] of a teacher without features."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        rows.append(teacher.predict_items(items).numpy())
    return np.concatenate(rows).astype(np.float32)


def unit_rows(features: np.ndarray | None, probs: np.ndarray) -> np.ndarray:
    """float32 [N, D] unit rows: the L2-normalised features, or sqrt(probs) without them."""
    if features is None:
        return np.sqrt(np.maximum(np.asarray(probs, np.float32), 0.0))
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Space:
    """A data set, its pseudo-labels and the labeled examples in one FM space."""

    dataset: Any
    """The unlabeled data (``zmdevice.data``)."""
    classes: list[str]
    """Class names, index = class id (the label file's)."""
    fm_probs: np.ndarray
    """float32 [N, C] the label file's probabilities, aligned with ``dataset.ids``."""
    x: np.ndarray
    """float32 [N, D] unit feature rows of the data."""
    kind: str
    """"features" (the FM's) or "probabilities" (sqrt of the FM's, no feature space)."""
    spec: str
    """The teacher spec the features come from."""
    labeled: Any = None
    """The labeled data set, or None."""
    labeled_y: np.ndarray | None = None
    """int64 [L] class ids of the labeled examples."""
    labeled_x: np.ndarray | None = None
    """float32 [L, D] their unit feature rows."""
    labeled_probs: np.ndarray | None = None
    """float32 [L, C] the FM's probabilities of them."""
    labeled_row: np.ndarray | None = None
    """int64 [L] each labeled example's row in the data, -1 where the data lacks its id."""


def settings_space(config) -> Space:
    """``load_space`` for a command's settings (``curation.settings.FeatureSettings`` plus
    ``data``, ``pseudo_labels`` and ``labeled``)."""
    return load_space(
        config.data, config.pseudo_labels, config.labeled, teacher=config.teacher,
        features=config.features, data_options=config.data_options, device=config.device,
        batch_size=config.batch_size,
    )  # fmt: skip


def load_space(
    data: str | os.PathLike,
    pseudo_labels: str | os.PathLike,
    labeled: str | os.PathLike | None = None,
    *,
    teacher: str | None = None,
    features: str | os.PathLike | None = None,
    data_options=None,
    device: str = "cpu",
    batch_size: int = 64,
) -> Space:
    """Read ``data``, its pseudo-label file and optional labeled examples into a Space.

    Args:
        data: the unlabeled data the label file labels.
        pseudo_labels: its `zmdevice label` output.
        labeled: a labeled table or Label Studio export (``data.open_dataset``).
        teacher: the FM for features; None: the label file's teacher.
        features: a ``.npy`` file of features [N, D] aligned with the data's rows, instead
            of running the teacher (labeled examples must then be in the data).
        data_options: column names (``config.DataOptions``).
        device: where the teacher runs on a cache miss.
        batch_size: teacher batch size.

    Raises:
        UserError: missing files, a label file of other data, unknown labels, a features
            file of the wrong shape.
    """
    from zmdevice.classes import ClassList
    from zmdevice.data import label_indices, open_dataset
    from zmdevice.pseudolabels import read_pseudolabels

    dataset = open_dataset(data, data_options)
    if not Path(pseudo_labels).is_file():
        raise UserError(
            f"--pseudo-labels {pseudo_labels} does not exist; make it with `zmdevice label`"
        )
    pseudo = read_pseudolabels(pseudo_labels)
    pseudo.check_fingerprint(dataset.fingerprint())
    fm_probs = pseudo.select(dataset.ids).dense_probs()
    metadata = pseudo.metadata
    class_list = ClassList(
        names=pseudo.classes,
        prompts={n: list((metadata.get("prompts") or {}).get(n, [])) for n in pseudo.classes},
    )
    templates = metadata.get("templates")
    templates = templates if isinstance(templates, str) else None
    recorded = metadata.get("teacher") or {}
    # The teacher as the user named it first: a catalog name brings its entry back (an
    # image teacher's shipped class map), which the resolved spec has lost.
    spec = teacher or recorded.get("name") or recorded.get("spec")
    labeled_set = None
    if labeled is not None:
        labeled_set = open_dataset(
            labeled, data_options, modality=dataset.modality, require_labels=True
        )
        labeled_y = label_indices(
            labeled_set, pseudo.classes, owner=f"the label file {pseudo_labels}"
        )
        position = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
        labeled_row = np.array([position.get(i, -1) for i in labeled_set.ids], dtype=np.int64)
    if features is not None:
        raw = _read_features_file(Path(features), len(dataset))
        kind, spec = "features", f"file:{features}"
    else:
        if not spec:
            raise UserError(
                f"{pseudo_labels} names no teacher: pass the teacher (or a features file)"
            )
        raw, _ = fm_outputs(
            dataset, spec, class_list, probs=False, templates=templates, device=device,
            batch_size=batch_size,
        )  # fmt: skip
        kind = "features" if raw is not None else "probabilities"
    x = unit_rows(raw, fm_probs)
    if labeled_set is None:
        return Space(dataset, pseudo.classes, fm_probs, x, kind, spec)
    outside = labeled_row < 0
    labeled_x = np.zeros((len(labeled_set), x.shape[1]), np.float32)
    labeled_probs = np.zeros((len(labeled_set), len(pseudo.classes)), np.float32)
    inside = np.flatnonzero(~outside)
    labeled_x[inside] = x[labeled_row[inside]]
    labeled_probs[inside] = fm_probs[labeled_row[inside]]
    if outside.any():
        if features is not None:
            example = labeled_set.ids[int(np.flatnonzero(outside)[0])]
            raise UserError(
                f"{int(outside.sum())} labeled examples (e.g. '{example}') are not in {data}, "
                "so the features file has no row for them: add them to the data or drop "
                "the features file"
            )
        own_features, own_probs = fm_outputs(
            labeled_set, spec, class_list, templates=templates, device=device,
            batch_size=batch_size,
        )  # fmt: skip
        rows = np.flatnonzero(outside)
        labeled_x[rows] = unit_rows(own_features, own_probs)[rows]
        labeled_probs[rows] = own_probs[rows]
    return Space(
        dataset, pseudo.classes, fm_probs, x, kind, spec,
        labeled_set, labeled_y, labeled_x, labeled_probs, labeled_row,
    )  # fmt: skip


def _read_features_file(path: Path, rows: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"features file not found: {path}; check the path")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a numpy .npy array file ({error})") from None
    if array.ndim != 2 or len(array) != rows:
        raise UserError(
            f"{path} holds an array of shape {array.shape}; expected [{rows}, D], one row per "
            "sample of the data in its order"
        )
    return array.astype(np.float32)


def student_probs(student_dir, dataset, classes: list[str], *, device="cpu", batch_size=64):
    """A trained student's probabilities float32 [N, C] of ``dataset`` (``evaluate``).

    Raises:
        UserError: not a student folder, or a student of other classes.
    """
    from zmdevice.evaluate import predict_student
    from zmdevice.students import load_student

    student = load_student(student_dir)
    if list(student.classes) != list(classes):
        raise UserError(
            f"the student {student_dir} classifies other classes than the label file "
            f"({len(student.classes)} vs {len(classes)}, or another order): give a student "
            "trained on these pseudo-labels"
        )
    return predict_student(student, dataset, batch_size=batch_size, device=device)
