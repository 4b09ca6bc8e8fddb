"""zmdevice: ZeroMatch on small hardware.

Foundation-model zero-shot pseudo-labels plus a few true labels train a small student
(MobileNetV3 or DistilBERT) on a laptop CPU; the student ships as ONNX.

The Python API mirrors the command line (``zmdevice.api`` has the details)::

    import zmdevice

    labels = zmdevice.label(texts, classes=["animal", "plant"], teacher="minilm")
    student = zmdevice.train(labeled_pairs, texts, labels, kd_steps=60, ssl_steps=60)
    onnx_file = zmdevice.export(student)
    zmdevice.load(onnx_file).predict(["a small furry pet"])

Every mistake in the input raises ``zmdevice.UserError`` with a one-line message.
"""

import importlib
import inspect
import sys
import types

from zmdevice.errors import UserError

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "TrainedStudent",
    "UserError",
    "ZeroMatchClassifier",
    "__version__",
    "export",
    "label",
    "load",
    "train",
]

_STAGES = ("label", "train", "export")
"""Stage modules that are also API functions of the same name."""
_API = ("load", "Classifier", "TrainedStudent")


class _Stage(types.ModuleType):
    """A stage module that, called, is the API function of its name.

    ``zmdevice.label`` must stay the module ``zmdevice/label.py`` (importing a submodule
    sets the package attribute of that name), so the module itself is made callable:
    ``zmdevice.label(...)`` runs ``zmdevice.api.label(...)``.
    """

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)

    @property
    def _function(self):
        from zmdevice import api

        return getattr(api, self.__name__.rpartition(".")[2])

    @property
    def __signature__(self):
        return inspect.signature(self._function)


class _Package(types.ModuleType):
    """The zmdevice package: each stage submodule becomes a ``_Stage`` when imported."""

    def __setattr__(self, name, value):
        if name in _STAGES and isinstance(value, types.ModuleType):
            value.__class__ = _Stage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    # Importing zmdevice (as every CLI command does) stays cheap: the API and the stage
    # modules load on first use of their names.
    if name in _STAGES:
        return importlib.import_module(f"zmdevice.{name}")
    if name in _API:
        from zmdevice import api

        return getattr(api, name)
    if name == "ZeroMatchClassifier":  # the sklearn extra's estimator
        from zmdevice.sklearn import ZeroMatchClassifier

        return ZeroMatchClassifier
    raise AttributeError(f"module 'zmdevice' has no attribute {name!r}")
