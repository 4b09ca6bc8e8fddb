"""Shared test setup (offline, single-threaded, small) and the fixtures several test files
use; the plain helpers they share are in ``helpers.py``."""

import os
import random
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Teachers exported to ONNX (--runtime auto on a CPU) go to a cache folder: a fresh one per
# test session, never the user's ~/.cache.
os.environ["ZMDEVICE_CACHE"] = tempfile.mkdtemp(prefix="zmdevice-test-cache-")


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (use with ``usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embed_dir(tmp_path_factory):
    """A tiny randomly initialised text-embed teacher folder (``text-embed:<dir>``)."""
    import tiny_teachers

    return tiny_teachers.make_text_embed(tmp_path_factory.mktemp("embed") / "m")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """60 texts of 3 classes: unlabeled.csv, labeled.csv (6), test.csv (15) and a 70%-right
    fake FM's labels.parquet."""
    from helpers import (
        FILLER,
        TEXT_CLASSES,
        TEXT_WORDS,
        noisy_teacher_probs,
        write_pseudolabels,
        write_table,
    )

    from zmdevice.data import open_dataset

    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    rows = []
    for i in range(60):
        name = TEXT_CLASSES[i % 3]
        words = [
            rng.choice(TEXT_WORDS[name]) if rng.random() < 0.5 else rng.choice(FILLER)
            for _ in range(6)
        ]
        rows.append((f"s{i}", " ".join(words), name))
    write_table(root / "unlabeled.csv", rows)
    write_table(root / "labeled.csv", rows[:6])
    write_table(root / "test.csv", rows[:15])
    unlabeled = open_dataset(root / "unlabeled.csv")
    gold = [TEXT_CLASSES.index(row[2]) for row in rows]
    probs = noisy_teacher_probs(gold, len(TEXT_CLASSES))
    write_pseudolabels(
        root / "labels.parquet", unlabeled.ids, TEXT_CLASSES, unlabeled.fingerprint(), probs
    )
    return root


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """48 20 px images of 3 colour classes: unlabeled/, labeled/ (6), test/ (15) and a
    70%-right fake FM's labels.parquet."""
    import numpy as np
    from helpers import IMAGE_CLASSES, noisy_teacher_probs, write_pseudolabels
    from PIL import Image

    from zmdevice.data import open_dataset

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    gold = []
    for i in range(48):
        label = i % 3
        pixels = rng.integers(0, 80, (20, 20, 3)).astype(np.uint8)
        pixels[..., label] += 150
        folders = [root / "unlabeled"]
        if i < 6:
            folders.append(root / "labeled" / IMAGE_CLASSES[label])
        if i < 15:
            folders.append(root / "test" / IMAGE_CLASSES[label])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        gold.append(label)
    unlabeled = open_dataset(root / "unlabeled")
    probs = noisy_teacher_probs(gold, len(IMAGE_CLASSES))
    write_pseudolabels(
        root / "labels.parquet", unlabeled.ids, IMAGE_CLASSES, unlabeled.fingerprint(), probs
    )
    return root
