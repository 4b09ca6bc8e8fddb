"""Hugging Face ``datasets.Dataset`` objects (API) and ``save_to_disk`` folders (CLI) as
data: the same rows read like a CSV table or a DataFrame on disk (ids, labels, fingerprint),
``ClassLabel`` integers become their names, and an ``Image`` column makes image data.
Datasets are built in memory; nothing is downloaded."""

import csv
import json
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
from helpers import FAST, TOPIC_NAMES, write_texts
from loop_data import CLASSES, loop_data, write_labeled
from PIL import Image
from tiny_teachers import tiny_teacher_spec
from typer.testing import CliRunner

import zmdevice
from zmdevice.api import _as_items
from zmdevice.cli import app
from zmdevice.data import open_dataset
from zmdevice.inputs import data_path, image_id
from zmdevice.pseudolabels import read_pseudolabels

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


def test_an_image_column_that_is_not_decoded_reads_as_its_images():
    pictures = images(2)
    features = datasets.Features({"image": datasets.Image(decode=False)})
    raw = datasets.Dataset.from_dict({"image": pictures}, features=features)
    same_data(open_dataset(data_path(raw, "data")), open_dataset(data_path(pictures, "data")))
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}]}, features=features
    )
    with pytest.raises(zmdevice.UserError, match="row 1 of the image column 'image'"):
        data_path(broken, "data")


# ------------------------------------------------------------- save_to_disk folders (CLI)


def saved(dataset, folder):
    dataset.save_to_disk(str(folder))
    return folder


def test_a_saved_text_folder_reads_like_the_same_rows_in_a_csv_and_a_parquet(tmp_path):
    names = [NAMES[i] for i in LABELS]
    csv_file = write_csv(tmp_path / "t.csv", ["text", "label"], zip(TEXTS, names, strict=True))
    pd.DataFrame({"text": TEXTS, "label": names}).to_parquet(tmp_path / "t.parquet")
    folder = saved(text_dataset(), tmp_path / "saved")
    from_folder = open_dataset(folder, require_labels=True)
    assert from_folder.source == folder  # errors and summaries name the folder
    same_data(from_folder, open_dataset(csv_file))
    same_data(from_folder, open_dataset(tmp_path / "t.parquet"))
    same_data(from_folder, open_dataset(data_path(text_dataset(), "data")))  # the object
    with_ids = saved(text_dataset(with_ids=True), tmp_path / "ids")
    assert open_dataset(with_ids).ids == [f"r{i}" for i in range(len(TEXTS))]


def write_pngs(folder, pictures, labels):
    """The images as PNG files in one sub-folder per class, and an image table of them."""
    rows = []
    for n, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
        path = folder / NAMES[label] / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        rows.append((f"{NAMES[label]}/{n}.png", image_id(picture), NAMES[label]))
    return rows


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "bytes"])
def test_a_saved_image_folder_reads_like_an_image_table_of_the_same_files(tmp_path, decode):
    pictures, labels = images(), [0, 1, 2, 1]
    rows = write_pngs(tmp_path / "pngs", pictures, labels)
    table = write_csv(tmp_path / "pngs" / "table.csv", ["path", "id", "label"], rows)
    files = [str(tmp_path / "pngs" / row[0]) for row in rows]  # an Image column of the files
    features = datasets.Features(
        {"image": datasets.Image(decode=decode), "label": datasets.ClassLabel(names=NAMES)}
    )
    dataset = datasets.Dataset.from_dict({"image": files, "label": labels}, features=features)
    folder = saved(dataset, tmp_path / "saved")
    from_folder = open_dataset(folder, require_labels=True)
    assert from_folder.modality == "image" and from_folder.source == folder
    same_data(from_folder, open_dataset(table))  # PIL's PNGs: the same sizes, so fingerprint
    same_data(from_folder, open_dataset(data_path(list(zip(pictures, [NAMES[i] for i in labels],
                                                           strict=True)), "labeled")))  # fmt: skip
    for index, picture in enumerate(pictures):
        assert np.array_equal(np.asarray(from_folder.load_image(index)), np.asarray(picture))


def test_a_dataset_dict_folder_names_its_splits_and_one_split_folder_reads(tmp_path):
    splits = datasets.DatasetDict({"train": text_dataset(), "test": text_dataset()})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(zmdevice.UserError, match=r"splits train, test: give one split's folder"):
        open_dataset(tmp_path / "dd")
    same_data(open_dataset(tmp_path / "dd" / "train"), open_dataset(data_path(text_dataset(), "d")))


def test_bad_saved_folders_are_one_line_errors_naming_the_folder(tmp_path):
    folder = saved(text_dataset(), tmp_path / "saved")
    (folder / "state.json").unlink()
    with pytest.raises(zmdevice.UserError, match=r"not a complete saved .*no state.json.*save_to"):
        open_dataset(folder)
    folder = saved(text_dataset(), tmp_path / "corrupt")
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(zmdevice.UserError, match="cannot read the saved datasets.Dataset"):
        open_dataset(folder)
    no_text = saved(datasets.Dataset.from_dict({"words": ["a", "b"]}), tmp_path / "no_text")
    with pytest.raises(zmdevice.UserError, match=r"no_text has no column 'text' \(columns: words"):
        open_dataset(no_text)
    nested = saved(datasets.Dataset.from_dict({"text": [["a"], ["b"]]}), tmp_path / "nested")
    with pytest.raises(zmdevice.UserError, match="column 'text' of .*nested holds list values"):
        open_dataset(nested)
    pictures = saved(image_dataset(images(2), [0, 1]), tmp_path / "pictures")
    with pytest.raises(zmdevice.UserError, match="of images, but text data is needed"):
        open_dataset(pictures, modality="text")
    unlabeled = saved(datasets.Dataset.from_dict({"text": ["a", "b"]}), tmp_path / "unlabeled")
    with pytest.raises(zmdevice.UserError, match="unlabeled has no column 'label'"):
        open_dataset(unlabeled, require_labels=True)


def test_without_the_datasets_extra_a_saved_folder_names_it(tmp_path, monkeypatch):
    folder = saved(text_dataset(), tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    out = str(tmp_path / "o.parquet")
    args = ["label", str(folder), "--classes", "a,b", "--teacher", "minilm", "--out", out]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {folder} is a saved datasets.Dataset; reading it needs the Python package "
        "'datasets', which is not installed: pip install 'zmdevice[datasets]'"
    ]


def test_label_reads_a_saved_image_folder_as_the_image_table_of_the_same_files(tmp_path):
    pictures, labels = images(6), [0, 1, 2, 0, 1, 2]
    rows = write_pngs(tmp_path / "pngs", pictures, labels)
    table = write_csv(tmp_path / "pngs" / "table.csv", ["path", "id", "label"], rows)
    folder = saved(image_dataset(pictures, labels), tmp_path / "saved")
    teacher = tiny_teacher_spec("imagenet", tmp_path / "teacher", NAMES)
    runner = CliRunner()
    for data, out in ((folder, "a.parquet"), (table, "b.parquet")):
        args = ["label", str(data), "--classes", ",".join(NAMES), "--teacher", teacher,
                "--device", "cpu", "--workers", "0", "--out", str(tmp_path / out)]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    a, b = read_pseudolabels(tmp_path / "a.parquet"), read_pseudolabels(tmp_path / "b.parquet")
    assert a.ids == b.ids and np.array_equal(a.topk_prob, b.topk_prob)
    assert a.metadata["data"]["fingerprint"] == b.metadata["data"]["fingerprint"]


def saved_table(csv_file, folder):
    """A text table as a saved dataset folder (every column a string)."""
    with open(csv_file, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    return saved(datasets.Dataset.from_dict(columns), folder)


def test_label_few_shot_and_gold_take_saved_folders(tmp_path, embed_dir):
    texts = saved_table(write_texts(tmp_path / "texts.csv", 12), tmp_path / "texts")
    examples = saved_table(write_texts(tmp_path / "ex.csv", 6, labels=True), tmp_path / "ex")
    args = ["label", str(texts), "--classes", TOPIC_NAMES, "--teacher", f"text-embed:{embed_dir}",
            "--device", "cpu", "--workers", "0", "--json"]  # fmt: skip
    runner = CliRunner()
    from_folder = runner.invoke(app, [*args, "--out", str(tmp_path / "a.parquet"), "--gold",
                                      str(examples), "--few-shot", str(examples)])  # fmt: skip
    assert from_folder.exit_code == 0, from_folder.output
    table = str(tmp_path / "ex.csv")
    from_csv = runner.invoke(app, ["label", str(tmp_path / "texts.csv"), *args[2:], "--out",
                                   str(tmp_path / "b.parquet"), "--gold", table,
                                   "--few-shot", table])  # fmt: skip
    assert from_csv.exit_code == 0, from_csv.output
    a, b = read_pseudolabels(tmp_path / "a.parquet"), read_pseudolabels(tmp_path / "b.parquet")
    assert a.ids == b.ids and np.array_equal(a.topk_prob, b.topk_prob)
    assert a.metadata["data"]["fingerprint"] == b.metadata["data"]["fingerprint"]
    quality, on_disk = a.metadata["quality"], b.metadata["quality"]
    assert quality.pop("gold") == str(examples) and on_disk.pop("gold").endswith("ex.csv")
    assert quality == on_disk  # the same gold report


def test_train_takes_saved_folders(text_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = {
        name: saved_table(text_data / f"{name}.csv", tmp_path / name)
        for name in ("labeled", "unlabeled", "test")
    }
    settings = tmp_path / "fast.toml"
    settings.write_text("".join(f"{key} = {value}\n" for key, value in FAST.items()))
    labels = str(text_data / "labels.parquet")
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--labeled", str(folders["labeled"]),
                                  "--unlabeled", str(folders["unlabeled"]), "--test",
                                  str(folders["test"]), "--pseudo-labels", labels,
                                  "--student", "tiny-distilbert", "--kd-steps", "2",
                                  "--ssl-steps", "2", "--device", "cpu", "--config",
                                  str(settings), "--out", "model", "--json"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert (summary["labeled"], summary["unlabeled"]) == (6, 60) and "test_accuracy" in summary
    scored = runner.invoke(app, ["evaluate", "model", "--data", str(folders["test"]), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["accuracy"] == summary["test_accuracy"]


def test_suggest_and_check_take_saved_folders_with_the_csvs_pseudo_labels(tmp_path):
    loop = loop_data(tmp_path)  # labels.parquet carries data.csv's fingerprint
    data = saved_table(loop["data"], tmp_path / "data")
    pairs = list(zip(loop["ids"], loop["gold"], strict=True))[:24]
    rows = [(i, f"text {n}", CLASSES[g]) for n, (i, g) in enumerate(pairs)]
    labeled = saved_table(write_labeled(tmp_path / "labeled.csv", rows), tmp_path / "labeled")
    common = ["--pseudo-labels", str(loop["labels"]), "--features", str(loop["features"])]
    runner = CliRunner()
    suggested = runner.invoke(app, ["suggest", str(data), *common, "--labeled", str(labeled),
                                    "--n", "4", "--out", str(tmp_path / "next.csv"),
                                    "--json"])  # fmt: skip
    assert suggested.exit_code == 0, suggested.output
    picked = {row["id"] for row in json.loads(suggested.stdout)["rows"]}
    assert len(picked) == 4 and not picked & {row[0] for row in rows}
    checked = runner.invoke(app, ["check", str(labeled), "--data", str(data), *common,
                                  "--out", str(tmp_path / "check.csv"), "--json"])  # fmt: skip
    assert checked.exit_code == 0, checked.output
    assert {row["id"] for row in json.loads(checked.stdout)["rows"]} <= {row[0] for row in rows}
