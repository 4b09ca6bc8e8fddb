"""zmdevice: ZeroMatch on small hardware.

Foundation-model zero-shot pseudo-labels plus a few true labels train a small student
(EfficientNet-Lite0, MobileNetV3 or DistilBERT) on a laptop CPU; the student ships as ONNX.

The Python API mirrors the command line (``zmdevice.api`` has the details)::

    import zmdevice

    labels = zmdevice.label(texts, classes=["animal", "plant"], teacher="minilm")
    student = zmdevice.train(labeled_pairs, texts, labels, kd_steps=60, ssl_steps=60)
    onnx_file = zmdevice.export(student)
    zmdevice.load(onnx_file).predict(["a small furry pet"])

Every mistake in the input raises ``zmdevice.UserError`` with a one-line message.
"""

from zmdevice.errors import UserError

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "TrainedStudent",
    "UserError",
    "ZeroMatchClassifier",
    "__version__",
    "check",
    "export",
    "label",
    "load",
    "suggest",
    "train",
]

_API = ("label", "train", "export", "load", "suggest", "check", "Classifier", "TrainedStudent")
"""Names of ``zmdevice.api``; the stages themselves live in ``labeling/``, ``training/`` and
``exporting/``, so no submodule shadows these functions."""


def __getattr__(name: str):
    # Importing zmdevice (as every CLI command does) stays cheap: the API loads on first use
    # of its names (PEP 562).
    if name in _API:
        from zmdevice import api

        return getattr(api, name)
    if name == "ZeroMatchClassifier":  # the sklearn extra's estimator
        from zmdevice.sklearn import ZeroMatchClassifier

        return ZeroMatchClassifier
    raise AttributeError(f"module 'zmdevice' has no attribute {name!r}")
