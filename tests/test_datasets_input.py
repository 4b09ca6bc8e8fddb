"""Hugging Face ``datasets.Dataset`` objects (API) and ``save_to_disk`` folders (CLI) as
data: the same rows read like a CSV table or a DataFrame on disk (ids, labels, fingerprint),
``ClassLabel`` integers become their names, and an ``Image`` column makes image data.
Datasets are built in memory; nothing is downloaded."""

import csv

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import zmdevice
from zmdevice.api import _as_items
from zmdevice.data import open_dataset
from zmdevice.inputs import data_path

NAMES = ["animal", "plant", "food"]
TEXTS = ['a "quoted", dog', "two\nlines of tree", "café bread", "plain", "plain", "a cat"]
LABELS = [0, 1, 2, 0, 1, 0]


@pytest.fixture(autouse=True)
def input_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))


def text_dataset(with_ids=False, labels=LABELS):
    columns = {"text": TEXTS, "label": labels}
    features = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)}
    if with_ids:
        columns["id"] = [f"r{i}" for i in range(len(TEXTS))]
        features["id"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def images(count=4):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)) for _ in range(count)]


def image_dataset(pictures, labels):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    )
    return datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features)


def same_data(a, b):
    assert a.modality == b.modality
    assert a.ids == b.ids
    assert a.labels == b.labels
    assert a.fingerprint() == b.fingerprint()


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_a_text_dataset_reads_like_the_same_rows_in_a_csv_and_a_dataframe(tmp_path):
    names = [NAMES[i] for i in LABELS]
    csv_file = write_csv(tmp_path / "t.csv", ["text", "label"], zip(TEXTS, names, strict=True))
    on_disk = open_dataset(csv_file)
    from_dataset = open_dataset(data_path(text_dataset(), "data"))
    same_data(from_dataset, on_disk)
    assert from_dataset.labels == names  # ClassLabel integers as their names
    frame = pd.DataFrame({"text": TEXTS, "label": names})
    assert data_path(text_dataset(), "data") == data_path(frame, "data")  # the same file

    ids = [f"r{i}" for i in range(len(TEXTS))]
    rows = zip(ids, TEXTS, names, strict=True)
    with_ids = open_dataset(write_csv(tmp_path / "ids.csv", ["id", "text", "label"], rows))
    same_data(open_dataset(data_path(text_dataset(with_ids=True), "data")), with_ids)
    assert with_ids.ids == ids


def test_class_label_minus_one_is_no_label():
    hidden = open_dataset(data_path(text_dataset(labels=[-1] * len(TEXTS)), "data"))
    assert hidden.labels is None  # an unlabeled split (hidden test labels): no label column
    same_data(hidden, open_dataset(data_path(TEXTS, "data")))
    with pytest.raises(zmdevice.UserError, match="2 of 6 rows have no label"):
        data_path(text_dataset(labels=[0, -1, 2, 0, -1, 1]), "labeled")


def test_an_image_dataset_reads_like_the_same_pil_images_with_labels(tmp_path):
    pictures = images()
    labels = [0, 1, 2, 1]
    pairs = [(picture, NAMES[label]) for picture, label in zip(pictures, labels, strict=True)]
    from_pairs = open_dataset(data_path(pairs, "labeled"))
    from_dataset = open_dataset(data_path(image_dataset(pictures, labels), "labeled"))
    assert from_dataset.modality == "image"
    same_data(from_dataset, from_pairs)
    assert from_dataset.labels == ["animal", "plant", "food", "plant"]
    assert np.array_equal(np.asarray(from_dataset.load_image(2)), np.asarray(pictures[2]))
    # The items of a prediction: the Image column (PIL images), or the text column.
    items = _as_items(image_dataset(pictures, labels), "image")
    assert [np.asarray(item).tolist() for item in items] == [
        np.asarray(p).tolist() for p in pictures
    ]
    assert _as_items(text_dataset(), "text") == TEXTS


def test_an_image_column_that_is_not_decoded_is_refused():
    features = datasets.Features({"image": datasets.Image(decode=False)})
    raw = datasets.Dataset.from_dict({"image": images(1)}, features=features)
    with pytest.raises(zmdevice.UserError, match="not images"):
        data_path(raw, "data")
