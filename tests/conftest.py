"""Shared test setup: offline, single-threaded, small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny image and text data sets of test_train, shared with the other training tests.
from test_train import image_data, text_data  # noqa: E402, F401
