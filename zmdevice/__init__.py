"""zmdevice: ZeroMatch on small hardware.

Foundation-model zero-shot pseudo-labels plus a few true labels train a small student
(MobileNetV3 or DistilBERT) on a laptop CPU; the student ships as ONNX.
"""

__version__ = "0.1.0"
