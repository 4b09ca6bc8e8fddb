"""The scikit-learn face of zmdevice: ``ZeroMatchClassifier``, an estimator over ``train``.

``fit(X, y)`` is ``zmdevice.train`` on the labeled pairs ``(X, y)`` and the pool
``X_unlabeled`` (default ``X``) with no pseudo-labels given: the run makes its own with the
foundation model ``teacher`` and the labeled examples, as `zmdevice train` without
``--pseudo-labels`` does. So the estimator drops into ``cross_val_score``, grid searches,
pipelines and cleanlab's ``CleanLearning`` like any scikit-learn classifier; each fit
trains a student from scratch.

Labels may be of any type numpy sorts (strings, integers): ``classes_`` is their sorted
array, the columns of ``predict_proba`` follow it and ``predict`` returns its values. The
FM reads the class names as ``str(label)``; names that say what the class is ("sports",
not 0) give a zero-shot teacher something to read.

Needs the ``sklearn`` extra (``pip install 'zmdevice[sklearn]'``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice.config import TrainConfig
from zmdevice.config_checks import shown
from zmdevice.errors import UserError
from zmdevice.inputs import is_dataframe, is_pil

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import NotFittedError
except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] != "sklearn":
        raise
    raise UserError(
        "zmdevice.ZeroMatchClassifier needs the Python package 'scikit-learn', which is not "
        "installed: pip install 'zmdevice[sklearn]'"
    ) from None

NAMED = ("teacher", "student", "method", "kd_steps", "ssl_steps", "seed", "device", "out")
"""The ``train`` arguments that are estimator parameters of their own."""


class NotFitted(UserError, NotFittedError):
    """``predict`` before ``fit``: a ``UserError`` that scikit-learn also recognises."""


class ZeroMatchClassifier(ClassifierMixin, BaseEstimator):
    """A zmdevice student as a scikit-learn classifier.

    Args:
        teacher: the FM that pseudo-labels the pool (a catalog name or ``kind:spec``);
            None: the default of the data's modality (``minilm`` for text).
        student: a student preset; None: the default of the data's modality.
        method: zeromatch, kd, supervised, fixmatch, adamatch or naive-pl.
        kd_steps: stage-1 steps; None: the modality's default.
        ssl_steps: stage-2 steps; None: the modality's default.
        seed: seed of weights, sampling and augmentation.
        device: auto, cpu, cuda, cuda:N or mps (defaults are ``TrainConfig``'s, as in
            ``zmdevice.train`` and on the command line).
        out: the folder each fit trains into (replacing the previous fit's files); None: a
            fresh temporary folder per fit, removed with the estimator. Leave it None when
            scikit-learn fits clones (cross-validation, searches): they would share it.
        train_options: any other ``zmdevice.train`` keyword (``threads``, ``lr``,
            ``kd_batch_size``, ``test``, ...), as a dict.
        progress: show the progress bars.

    Attributes (after ``fit``):
        classes_: the sorted labels [C]; the columns of ``predict_proba``.
        student_: the ``TrainedStudent`` (``.out`` is its folder; ``zmdevice.export`` takes it).
        summary_: what ``zmdevice.train`` returned.
    """

    def __init__(
        self,
        teacher: str | None = None,
        student: str | None = None,
        method: str = TrainConfig.method,
        kd_steps: int | None = TrainConfig.kd_steps,
        ssl_steps: int | None = TrainConfig.ssl_steps,
        seed: int = TrainConfig.seed,
        device: str = TrainConfig.device,
        out: str | os.PathLike | None = None,
        train_options: Mapping[str, Any] | None = None,
        progress: bool = False,
    ):
        # scikit-learn's contract: store the parameters unchanged, check them in fit.
        self.teacher = teacher
        self.student = student
        self.method = method
        self.kd_steps = kd_steps
        self.ssl_steps = ssl_steps
        self.seed = seed
        self.device = device
        self.out = out
        self.train_options = train_options
        self.progress = progress

    def fit(self, X: Any, y: Any, X_unlabeled: Any = None) -> ZeroMatchClassifier:
        """Train a student on the labeled ``(X, y)`` and the pool ``X_unlabeled``.

        Args:
            X: texts, PIL images or image paths [N] (a list, tuple, numpy array or Series).
            y: their labels [N].
            X_unlabeled: the unlabeled pool, items as ``X``; None: ``X`` itself. The FM
                labels it with the labeled examples' help.

        Returns:
            self, fitted.
        """
        from zmdevice.api import train

        items = _items(X, "X")
        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != len(items):
            raise UserError(
                f"y: expected one label per item of X ({len(items)}), got shape {labels.shape}"
            )
        classes = np.unique(labels)
        names = [str(value) for value in classes]
        if len(set(names)) != len(names):
            raise UserError(f"y: labels {names} are not distinct once written as text")
        if len(names) < 2:
            raise UserError(f"y: a classifier needs at least two classes, got {names}")
        odd = [name for name in names if not name or name != name.strip() or "," in name]
        if odd:
            raise UserError(
                f"y: label {odd[0]!r} cannot be a class name (empty, surrounding spaces or a comma)"
            )
        pool = items if X_unlabeled is None else _items(X_unlabeled, "X_unlabeled")
        options = _train_options(self.train_options)
        clash = sorted(set(options) & {*NAMED, "labeled", "unlabeled", "classes", "progress"})
        if clash:
            raise UserError(
                f"train_options: {', '.join(clash)} are set by the estimator's own parameters"
            )
        out, cleanup = self._fresh_folder()
        try:
            trained = train(
                [(item, name) for item, name in zip(items, [str(v) for v in labels], strict=True)],
                pool,
                student=self.student,
                method=self.method,
                device=self.device,
                out=out,
                progress=self.progress,
                teacher=self.teacher,
                kd_steps=self.kd_steps,
                ssl_steps=self.ssl_steps,
                seed=self.seed,
                classes=names,
                overwrite=self.out is not None,
                **options,
            )
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        self._release()
        self._cleanup = cleanup
        self.student_ = trained
        self.summary_ = trained.summary
        self.classes_ = classes
        # The student's columns, in classes_ order (the same order unless it was changed).
        self._columns = [trained.classes.index(name) for name in names]
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """float32 [len(X), len(classes_)] class probabilities, rows summing to 1."""
        student = self._fitted()
        return student.predict_proba(_items(X, "X"))[:, self._columns]

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each item [len(X)], values of ``classes_``."""
        probs = self.predict_proba(X)  # first: refuses an unfitted estimator
        return self.classes_[probs.argmax(axis=1)]

    def _fitted(self):
        if not hasattr(self, "student_"):
            raise NotFitted(
                f"this {type(self).__name__} is not fitted yet: call fit(X, y) before predicting"
            )
        return self.student_

    def _fresh_folder(self):
        """The folder this fit trains into, and how to remove it (None: the user's own)."""
        if self.out is not None:
            if not isinstance(self.out, str | os.PathLike):
                raise UserError(f"out: expected a folder path or None, got {shown(self.out)}")
            return Path(self.out), None
        folder = Path(tempfile.mkdtemp(prefix="zmdevice-sklearn-"))
        return folder, weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def _release(self) -> None:
        """Remove the previous fit's temporary folder (a refit replaces it)."""
        cleanup = getattr(self, "_cleanup", None)
        if cleanup is not None:
            cleanup()
        self._cleanup = None

    def __getstate__(self):
        # The folder's finalizer stays with the original: a copy (pickled, deep-copied)
        # reads the same folder while the original lives, or one given as ``out``.
        state = super().__getstate__()
        state.pop("_cleanup", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # items are texts or images, not feature rows
        tags.input_tags.string = True
        return tags


def _train_options(train_options: Any) -> dict[str, Any]:
    """``train_options`` as a fresh dict of ``train`` keywords; None is no options."""
    if train_options is None:
        return {}
    # dict() would also take a list of pairs; a mapping is the one form whose keys are keywords.
    if not isinstance(train_options, Mapping):
        raise UserError(
            f"train_options must be a dict of zmdevice.train keywords (e.g. {{'lr': 0.001}}), "
            f"got {shown(train_options)}"
        )
    odd = [key for key in train_options if not isinstance(key, str)]
    if odd:
        raise UserError(f"train_options: keys must be keyword names (strings), got {shown(odd[0])}")
    return dict(train_options)


def _items(data: Any, role: str) -> list:
    """Texts (plain ``str``), PIL images or image paths [N] as a list; UserError otherwise."""
    if is_dataframe(data):
        raise UserError(f"{role}: pass a list (or array, Series) of items, not a DataFrame")
    if hasattr(data, "tolist") and not is_pil(data):  # numpy arrays, pandas Series
        data = data.tolist()
    if isinstance(data, str | bytes | os.PathLike | Mapping) or is_pil(data):
        raise UserError(f"{role}: pass a list of items (one item: [item]), got a single one")
    if not isinstance(data, Iterable):
        raise UserError(
            f"{role}: pass a list of texts, PIL images or image paths, got {shown(data)}"
        )
    items = [str(item) if isinstance(item, str) else item for item in data]
    if not items:
        raise UserError(f"{role} is empty: give at least one item")
    return items
