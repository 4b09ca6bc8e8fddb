"""Shared test setup: offline, single-threaded, small."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Teachers exported to ONNX (--runtime auto on a CPU) go to a cache folder: a fresh one per
# test session, never the user's ~/.cache.
os.environ["ZMDEVICE_CACHE"] = tempfile.mkdtemp(prefix="zmdevice-test-cache-")

# The tiny image and text data sets of test_train, shared with the other training tests.
from test_train import image_data, text_data  # noqa: E402, F401
