"""examples/build_datasets.py on tiny fake sources, on the real Debian files, and the
embedded default data in examples/default/."""

import gzip
import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zmdevice.classes import load_classes
from zmdevice.data import label_indices, open_dataset

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "examples" / "default"


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_datasets", ROOT / "examples" / "build_datasets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_builder()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    """6 training and 2 test images per class, each image filled with a unique value."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for prefix, per_class in (("train", 6), ("t10k", 2)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(build.read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(build.BuildError, match="not an idx file of unsigned bytes"):
        build.read_idx(tmp_path / "bad")


def test_build_images(tmp_path, fashion_dir):
    sizes = build.build_images(
        tmp_path / "out", fashion_dir=fashion_dir, labels_per_class=2, max_test=None, max_dev=5
    )
    # The pool would take every training image: the 5 dev images are taken out of it.
    assert sizes == {"unlabeled": 55, "labeled": 20, "dev": 5, "test": 20}
    out = tmp_path / "out"
    unlabeled = open_dataset(out / "unlabeled")
    labeled = open_dataset(out / "labeled", require_labels=True)
    dev = open_dataset(out / "dev", require_labels=True)
    test = open_dataset(out / "test", require_labels=True)
    assert (len(unlabeled), len(labeled), len(dev), len(test)) == (55, 20, 5, 20)
    dev_names = {sample_id.split("/")[-1] for sample_id in dev.ids}
    assert not dev_names & set(unlabeled.ids)
    assert all(name.startswith("train-") for name in dev_names)
    assert unlabeled.labels is None
    classes = load_classes(str(out / "classes.toml"))
    assert classes.names == build.FASHION_CLASSES and classes.has_prompts
    assert np.bincount(label_indices(labeled, classes), minlength=10).tolist() == [2] * 10
    assert np.bincount(label_indices(test, classes), minlength=10).tolist() == [2] * 10

    # Labeled images come from the pool: same file name and same bytes in unlabeled/.
    train_x = build.read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    train_y = build.read_idx(fashion_dir / "train-labels-idx1-ubyte.gz")
    for sample_id, label in zip(labeled.ids, labeled.labels, strict=True):
        name = sample_id.split("/")[-1]
        assert name in unlabeled.ids
        assert (out / "labeled" / sample_id).read_bytes() == (out / "unlabeled" / name).read_bytes()
        index = int(name[len("train-") : -len(".png")])
        assert build.FASHION_CLASSES[train_y[index]] == label
        assert np.array_equal(np.asarray(Image.open(out / "unlabeled" / name)), train_x[index])

    # The gold table of the pool has the folder's ids and the true labels.
    gold = open_dataset(out / "unlabeled_gold.csv", require_labels=True)
    assert gold.ids == unlabeled.ids
    for sample_id, label in zip(gold.ids, gold.labels, strict=True):
        assert build.FASHION_CLASSES[train_y[int(sample_id[6:11])]] == label
    assert (out / "BUILD.json").is_file()


def test_build_images_is_deterministic_and_seeded(tmp_path, fashion_dir):
    kwargs = {"fashion_dir": fashion_dir, "labels_per_class": 1, "max_unlabeled": 30, "max_dev": 5}
    build.build_images(tmp_path / "a", seed=3, max_test=5, **kwargs)
    build.build_images(tmp_path / "b", seed=3, max_test=5, **kwargs)
    build.build_images(tmp_path / "c", seed=4, max_test=5, **kwargs)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    # Rebuilding over its own output is allowed and gives the same files.
    build.build_images(tmp_path / "a", seed=3, max_test=5, **kwargs)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def files_of(folder: Path, leave_out: str) -> dict[str, bytes]:
    """Every file under ``folder`` but BUILD.json and those under ``leave_out``."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path.name != "BUILD.json" and leave_out not in path.parts
    }


def test_extra_test_images_leave_every_other_split_as_it_was(tmp_path, fashion_dir):
    kwargs = {"fashion_dir": fashion_dir, "labels_per_class": 1, "max_unlabeled": 30, "max_dev": 5}
    build.build_images(tmp_path / "a", seed=3, max_test=5, **kwargs)
    sizes = build.build_images(tmp_path / "b", seed=3, max_test=5, max_extra_test=8, **kwargs)
    assert sizes["test-extra"] == 8
    assert files_of(tmp_path / "a", "test-extra") == files_of(tmp_path / "b", "test-extra")
    extra = open_dataset(tmp_path / "b" / "test-extra", require_labels=True)
    test = open_dataset(tmp_path / "b" / "test", require_labels=True)
    assert len(extra) == 8 and not set(extra.ids) & set(test.ids)
    # More than the test images left: all of them (20 in the fake source, 5 in test/).
    sizes = build.build_images(tmp_path / "c", seed=3, max_test=5, max_extra_test=99, **kwargs)
    assert sizes["test-extra"] == 15


def test_build_refuses_foreign_folder_and_small_pool(tmp_path, fashion_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(build.BuildError, match="exists and was not made by this script"):
        build.build_images(tmp_path / "mine", fashion_dir=fashion_dir, max_dev=5)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    with pytest.raises(build.BuildError, match="fewer than --labels-per-class 7"):
        build.build_images(tmp_path / "x", fashion_dir=fashion_dir, labels_per_class=7, max_dev=5)
    assert not (tmp_path / "x").exists()
    with pytest.raises(build.BuildError, match="too few examples for a dev split of 100"):
        build.build_images(tmp_path / "y", fashion_dir=fashion_dir, max_dev=100)
    assert not list(tmp_path.glob(".x.*"))  # the staging folder is cleaned up


# ------------------------------------------------------------------ WordNet

CATEGORY_NUMBERS = {name: number for number, name in build.WORDNET_CATEGORIES.items()}


def fake_data_noun(path: Path, per_class: int = 6) -> list[tuple[str, str, str]]:
    """A data.noun with a licence header, 8 categories, an off-category and a repeat."""
    lines = ["  1 This software and database is being provided to you\n"]
    expected = []
    offset = 1000
    for name, number in CATEGORY_NUMBERS.items():
        for i in range(per_class):
            offset += 100
            text = f"{name} thing number {i}"
            lines.append(
                f"{offset:08d} {number} n 01 word{i} 0 001 @ 00001740 n 0000 | {text}; "
                f'"an example of {name}"  \n'
            )
            expected.append((f"n{offset:08d}", text, name))
    lines.append('00900000 03 n 01 entity 0 000 | that which exists; "x"\n')  # noun.Tops
    lines.append('00900100 05 n 01 dup 0 000 | animal thing number 0; "a repeat"\n')
    path.write_text("".join(lines), encoding="utf-8")
    return expected


def test_definition_strips_examples():
    assert build.definition('a dog; "the dog barked"; "another"') == "a dog"
    assert build.definition('the act of x: "he did x"  ') == "the act of x"
    assert build.definition('progress (in the phrase "make strides"); "big strides"') == (
        'progress (in the phrase "make strides")'
    )
    assert build.definition("plain definition; second sense") == "plain definition; second sense"
    assert build.definition('"only an example"') == ""


def test_read_wordnet_nouns(tmp_path):
    expected = fake_data_noun(tmp_path / "data.noun")
    rows = build.read_wordnet_nouns(tmp_path / "data.noun", build.WORDNET_CATEGORIES)
    assert rows == expected  # header, noun.Tops and the repeated definition are dropped


def test_build_text(tmp_path):
    fake_data_noun(tmp_path / "data.noun")
    out = tmp_path / "text"
    sizes = build.build_text(
        out, wordnet_file=tmp_path / "data.noun", labels_per_class=2, max_test=10, max_dev=4
    )
    assert sizes == {"unlabeled": 34, "labeled": 16, "dev": 4, "test": 10}
    unlabeled = open_dataset(out / "unlabeled.csv")
    gold = open_dataset(out / "unlabeled_gold.csv", require_labels=True)
    labeled = open_dataset(out / "labeled.csv", require_labels=True)
    test = open_dataset(out / "test.csv", require_labels=True)
    dev = open_dataset(out / "dev.csv", require_labels=True)
    assert unlabeled.labels is None
    assert len(dev) == 4 and not set(dev.ids) & (set(unlabeled.ids) | set(test.ids))
    assert gold.ids == unlabeled.ids and gold.texts == unlabeled.texts
    pool = dict(zip(unlabeled.ids, unlabeled.texts, strict=True))
    # Labeled examples are part of the pool with the same ids and texts.
    assert all(pool[i] == t for i, t in zip(labeled.ids, labeled.texts, strict=True))
    # Test is disjoint from the pool, by id and by text.
    assert not set(test.ids) & set(pool) and not set(test.texts) & set(pool.values())
    classes = load_classes(str(out / "classes.toml"))
    assert classes.names == list(build.WORDNET_DESCRIPTIONS) and len(classes) == 8
    assert all(len(classes.prompts[name]) == 1 for name in classes.names)
    assert np.bincount(label_indices(labeled, classes), minlength=8).tolist() == [2] * 8
    for sample_id, text, label in zip(gold.ids, gold.texts, gold.labels, strict=True):
        assert text.startswith(label) and sample_id.startswith("n")


def test_extra_test_texts_are_in_no_other_split(tmp_path):
    fake_data_noun(tmp_path / "data.noun")
    kwargs = {"wordnet_file": tmp_path / "data.noun", "labels_per_class": 2, "max_dev": 4}
    build.build_text(tmp_path / "a", max_test=10, max_unlabeled=20, **kwargs)
    code = build.main(
        ["--out", str(tmp_path / "b"), "--only", "text", "--wordnet-file",
         str(tmp_path / "data.noun"), "--labels-per-class", "2", "--max-test", "10",
         "--max-dev", "4", "--max-unlabeled", "20", "--max-extra-test", "6"]
    )  # fmt: skip
    assert code == 0
    a, b = tmp_path / "a", tmp_path / "b" / "text"
    assert files_of(a, "test-extra.csv") == files_of(b, "test-extra.csv")
    extra = open_dataset(b / "test-extra.csv", require_labels=True)
    others = {
        i for name in ("unlabeled.csv", "dev.csv", "test.csv") for i in open_dataset(b / name).ids
    }
    assert len(extra) == 6 and not set(extra.ids) & others
    assert json.loads((b / "BUILD.json").read_text())["sizes"]["test-extra"] == 6


def test_build_text_cli_and_missing_source(tmp_path, capsys):
    fake_data_noun(tmp_path / "data.noun")
    code = build.main(
        ["--out", str(tmp_path / "d"), "--only", "text", "--wordnet-file",
         str(tmp_path / "data.noun"), "--labels-per-class", "1", "--max-test", "8", "--seed", "5",
         "--max-dev", "4"]
    )  # fmt: skip
    assert code == 0 and len(open_dataset(tmp_path / "d" / "text" / "test.csv")) == 8
    # A missing source fails before anything is built (here: before the images).
    code = build.main(["--out", str(tmp_path / "e"), "--wordnet-file", str(tmp_path / "no")])
    assert code == 2 and not (tmp_path / "e").exists()
    message = capsys.readouterr().err
    assert "not found" in message and message.startswith("error: ")


# ------------------------------------------------------------------ digits


def fake_digits() -> tuple[np.ndarray, np.ndarray]:
    """8 images per digit of 8x8 pixels in 0..255, each image unique."""
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(10), 8))
    return rng.integers(0, 256, (len(labels), 8, 8)).astype(np.uint8), labels


def test_scale_digits_spreads_17_levels_over_bytes():
    levels = build.scale_digits(np.arange(17, dtype=np.float64).reshape(1, 17))
    assert levels.dtype == np.uint8 and levels[0, 0] == 0 and levels[0, -1] == 255
    assert np.all(np.diff(levels[0].astype(int)) > 0)  # no two grey levels merge


def test_build_digits(tmp_path):
    images, labels = fake_digits()
    out = tmp_path / "digits"
    sizes = build.build_digits(
        out, source=(images, labels), labels_per_class=2, max_test=20, max_dev=10, seed=2
    )
    # Test first (20), then the pool takes the other 60, giving 10 of them to dev.
    assert sizes == {"unlabeled": 50, "labeled": 20, "dev": 10, "test": 20}
    unlabeled = open_dataset(out / "unlabeled")
    labeled = open_dataset(out / "labeled", require_labels=True)
    dev = open_dataset(out / "dev", require_labels=True)
    test = open_dataset(out / "test", require_labels=True)
    names = {part: {i.split("/")[-1] for i in data.ids} for part, data in
             (("pool", unlabeled), ("dev", dev), ("test", test), ("labeled", labeled))}  # fmt: skip
    assert len(names["pool"] | names["dev"] | names["test"]) == 80  # disjoint, all used
    assert names["labeled"] <= names["pool"]
    classes = load_classes(str(out / "classes.toml"))
    assert classes.names == list(build.DIGIT_DESCRIPTIONS) and classes.has_prompts
    assert np.bincount(label_indices(labeled, classes), minlength=10).tolist() == [2] * 10
    # Every file holds its source image unchanged (8x8) under its true class.
    for data, folder in ((labeled, "labeled"), (dev, "dev"), (test, "test")):
        for sample_id, label in zip(data.ids, data.labels, strict=True):
            index = int(sample_id.split("/")[-1][len("digit-") : -len(".png")])
            assert classes.names[labels[index]] == label
            pixels = np.asarray(Image.open(out / folder / sample_id))
            assert np.array_equal(pixels, images[index])
    gold = open_dataset(out / "unlabeled_gold.csv", require_labels=True)
    assert gold.ids == unlabeled.ids
    assert all(classes.names[labels[int(i[6:11])]] == label
               for i, label in zip(gold.ids, gold.labels, strict=True))  # fmt: skip
    build.build_digits(tmp_path / "again", source=(images, labels), labels_per_class=2,
                       max_test=20, max_dev=10, seed=2)  # fmt: skip
    build.build_digits(tmp_path / "other", source=(images, labels), labels_per_class=2,
                       max_test=20, max_dev=10, seed=3)  # fmt: skip
    assert tree_digest(out) == tree_digest(tmp_path / "again") != tree_digest(tmp_path / "other")


@pytest.mark.slow
def test_build_real_digits(tmp_path):
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn (bench extra)")
    assert build.main(["--out", str(tmp_path), "--only", "digits", "--seed", "0"]) == 0
    sizes = {part: len(open_dataset(tmp_path / "digits" / part)) for part in
             ("unlabeled", "labeled", "dev", "test")}  # fmt: skip
    assert sizes == {"unlabeled": 1000, "labeled": 40, "dev": 300, "test": 497}
    test = open_dataset(tmp_path / "digits" / "test", require_labels=True)
    classes = load_classes(str(tmp_path / "digits" / "classes.toml"))
    assert np.bincount(label_indices(test, classes), minlength=10).min() > 30
    assert test.load_image(0).size == (8, 8)
    # The large sets' caps would leave no digit pool: refused before anything is written.
    assert build.main(["--out", str(tmp_path / "x"), "--only", "digits", "--max-test", "2000"]) == 2
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ real Debian data


@pytest.mark.slow
def test_build_real_debian_sources(tmp_path):
    if not (build.FASHION_DIR.is_dir() and build.WORDNET_NOUNS.is_file()):
        pytest.skip("needs apt-get install dataset-fashion-mnist wordnet-base")
    for only in ("images", "text"):  # the digits need scikit-learn: their own test
        code = build.main(
            ["--out", str(tmp_path), "--only", only, "--max-unlabeled", "300",
             "--max-test", "100", "--seed", "1"]
        )  # fmt: skip
        assert code == 0
    images = open_dataset(tmp_path / "images" / "test", require_labels=True)
    text = open_dataset(tmp_path / "text" / "test.csv", require_labels=True)
    assert len(images) == 100 and len(text) == 100
    assert len(open_dataset(tmp_path / "images" / "unlabeled")) == 300
    assert len(open_dataset(tmp_path / "text" / "labeled.csv")) == 32
    assert len(open_dataset(tmp_path / "text" / "dev.csv", require_labels=True)) == 1000
    assert len(open_dataset(tmp_path / "images" / "dev", require_labels=True)) == 1000
    image_classes = load_classes(str(tmp_path / "images" / "classes.toml"))
    label_indices(images, image_classes)  # every folder is a known class
    assert images.load_image(0).size == (28, 28)
    rows = build.read_wordnet_nouns(build.WORDNET_NOUNS, build.WORDNET_CATEGORIES)
    counts = {name: sum(row[2] == name for row in rows) for name in build.WORDNET_DESCRIPTIONS}
    assert 45_000 < len(rows) < 50_000 and min(counts.values()) > 1500
    assert not any('"' in text[:1] or text.endswith(";") for _, text, _ in rows)


# ------------------------------------------------------------------ embedded default


@pytest.mark.parametrize(
    ("modality", "sizes", "n_classes"),
    [("images", (2000, 40, 500), 10), ("text", (2000, 32, 400), 8)],
)
def test_embedded_default_loads(modality, sizes, n_classes):
    folder = DEFAULT / modality
    classes = load_classes(str(folder / "classes.toml"))
    assert len(classes) == n_classes and classes.has_prompts
    if modality == "images":
        unlabeled = open_dataset(folder / "unlabeled")
        labeled = open_dataset(folder / "labeled", require_labels=True)
        test = open_dataset(folder / "test", require_labels=True)
        assert set(s.split("/")[1] for s in labeled.ids) <= set(unlabeled.ids)
        assert unlabeled.load_image(0).size == (28, 28)
    else:
        unlabeled = open_dataset(folder / "unlabeled.csv")
        labeled = open_dataset(folder / "labeled.csv", require_labels=True)
        test = open_dataset(folder / "test.csv", require_labels=True)
        assert set(labeled.ids) <= set(unlabeled.ids)
        assert not set(test.ids) & set(unlabeled.ids)
    assert (len(unlabeled), len(labeled), len(test)) == sizes
    per_class = np.bincount(label_indices(labeled, classes), minlength=n_classes)
    assert per_class.tolist() == [4] * n_classes
    assert len(set(label_indices(test, classes).tolist())) == n_classes


def test_embedded_default_is_small_and_licensed():
    total = sum(path.stat().st_size for path in DEFAULT.rglob("*") if path.is_file())
    assert total < 3_000_000
    licences = (DEFAULT / "LICENSES.md").read_text()
    assert "Zalando SE" in licences and "WordNet 3.0 Copyright 2006 by Princeton" in licences
    assert (DEFAULT / "make_default.py").is_file()
