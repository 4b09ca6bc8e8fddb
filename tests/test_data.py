"""Data layer: formats, stable ids, class lists, lazy images, and every bad-input message."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zmdevice.classes import ClassList, load_classes
from zmdevice.config import DataOptions
from zmdevice.data import (
    ImageDataset,
    TextDataset,
    content_id,
    iter_images,
    label_indices,
    open_dataset,
)
from zmdevice.errors import UserError
from zmdevice.images import CorruptImage

ROWS = [
    {"id": "a1", "text": "a small dog", "label": "animal"},
    {"id": "b2", "text": "an oak tree, tall", "label": "plant"},
    {"id": "c3", "text": 'a "quoted" cat', "label": "animal"},
]


def write_table(path, rows, fmt=None):
    """Write dict rows as CSV, JSONL or Parquet (by suffix)."""
    fmt = fmt or path.suffix
    if fmt == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_png(path, mode="L", size=(6, 5), color=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ------------------------------------------------------------------ text tables


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_text_table_formats(tmp_path, suffix):
    data = open_dataset(write_table(tmp_path / f"t{suffix}", ROWS))
    assert isinstance(data, TextDataset) and data.modality == "text"
    assert data.ids == ["a1", "b2", "c3"]
    assert data.texts == [row["text"] for row in ROWS]
    assert data.labels == ["animal", "plant", "animal"]
    assert len(data) == 3 and data[2] == 'a "quoted" cat'
    assert data.source == tmp_path / f"t{suffix}"


def test_same_content_same_fingerprint_across_formats(tmp_path):
    prints = {
        open_dataset(write_table(tmp_path / f"t{s}", ROWS)).fingerprint()
        for s in [".csv", ".jsonl", ".parquet"]
    }
    assert len(prints) == 1
    other = [dict(row) for row in ROWS]
    other[0]["text"] = "a big dog"
    assert open_dataset(write_table(tmp_path / "o.csv", other)).fingerprint() not in prints


def test_custom_column_names(tmp_path):
    rows = [{"key": r["id"], "sentence": r["text"], "y": r["label"]} for r in ROWS]
    options = DataOptions(text_column="sentence", id_column="key", label_column="y")
    data = open_dataset(write_table(tmp_path / "t.csv", rows), options)
    assert data.ids == ["a1", "b2", "c3"] and data.labels[1] == "plant"


def test_unlabeled_table_has_no_labels(tmp_path):
    rows = [{"text": r["text"]} for r in ROWS]
    data = open_dataset(write_table(tmp_path / "t.jsonl", rows))
    assert data.labels is None


def test_derived_ids_are_stable_under_reordering(tmp_path):
    rows = [{"text": r["text"]} for r in ROWS] + [{"text": "a small dog"}]
    forward = open_dataset(write_table(tmp_path / "f.csv", rows))
    backward = open_dataset(write_table(tmp_path / "b.csv", rows[::-1]))
    assert dict(zip(forward.ids, forward.texts, strict=True)) == dict(
        zip(backward.ids, backward.texts, strict=True)
    )
    assert forward.ids[0] == content_id("a small dog")
    # A repeated text gets a distinct, still position-free id.
    assert forward.ids[3] == content_id("a small dog") + "~2"
    assert len(set(forward.ids)) == 4
    # The derived ids depend on the text only, not on the row number.
    assert forward.ids[1] == backward.ids[2]


def test_numeric_ids_and_labels_read_as_strings(tmp_path):
    rows = [{"id": 7, "text": "x", "label": 1}, {"id": 8, "text": "y", "label": 0}]
    data = open_dataset(write_table(tmp_path / "t.parquet", rows))
    assert data.ids == ["7", "8"] and data.labels == ["1", "0"]


# ------------------------------------------------------------------ text errors


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"data not found: .*nope\.csv does not exist"):
        open_dataset(tmp_path / "nope.csv")


def test_missing_column_names_it_and_the_flag(tmp_path):
    rows = [{"sentence": "x", "label": "a"}]
    with pytest.raises(UserError) as info:
        open_dataset(write_table(tmp_path / "t.csv", rows))
    message = str(info.value)
    assert "no column 'text'" in message
    assert "columns: sentence, label" in message
    assert "--text-column" in message and "t.csv" in message


def test_missing_label_column_when_required(tmp_path):
    rows = [{"text": "x"}, {"text": "y"}]
    with pytest.raises(UserError, match=r"no column 'label' \(columns: text\).*--label-column"):
        open_dataset(write_table(tmp_path / "t.jsonl", rows), require_labels=True)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_empty_table(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        path.write_text("id,text\n")
    elif suffix == ".jsonl":
        path.write_text("\n")
    else:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(
        UserError, match="empty data set|no column 'text' \\(columns: \\(none\\)\\)"
    ):
        open_dataset(path)
    if suffix != ".jsonl":
        with pytest.raises(UserError, match=r"empty data set: .* has no rows"):
            open_dataset(path)


def test_completely_empty_csv(tmp_path):
    (tmp_path / "t.csv").write_text("")
    with pytest.raises(UserError, match="empty data set: .*t.csv has no header row"):
        open_dataset(tmp_path / "t.csv")


def test_duplicate_ids_name_the_id_and_rows(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[2], id="a1")]
    with pytest.raises(UserError, match=r"duplicate id 'a1' in .*t.csv: rows 1 and 3"):
        open_dataset(write_table(tmp_path / "t.csv", rows))


def test_missing_text_cell(tmp_path):
    (tmp_path / "t.csv").write_text("id,text\n1,hello\n2,\n")
    with pytest.raises(UserError, match=r"row 2 of .*t.csv has no text in column 'text'"):
        open_dataset(tmp_path / "t.csv")


def test_missing_label_cell(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhello,a\nworld,\n")
    with pytest.raises(UserError, match=r"row 2 of .*t.csv has no label in column 'label'"):
        open_dataset(tmp_path / "t.csv")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(UserError, match=r"unsupported file type '.xlsx' .*\.csv, \.jsonl or"):
        open_dataset(tmp_path / "t.xlsx")
    save_png(tmp_path / "one.png")
    with pytest.raises(UserError, match="a single image is not a data set"):
        open_dataset(tmp_path / "one.png")


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(UserError, match=r"line 2 of .*t.jsonl is not valid JSON"):
        open_dataset(tmp_path / "t.jsonl")


def test_csv_row_with_too_many_fields(tmp_path):
    (tmp_path / "t.csv").write_text("id,text\n1,a, b\n")
    with pytest.raises(UserError, match=r"line 2 of .*t.csv has 3 fields .*quote texts"):
        open_dataset(tmp_path / "t.csv")


def test_text_modality_on_folder(tmp_path):
    save_png(tmp_path / "imgs" / "a.png")
    with pytest.raises(UserError, match="is a folder, but text data must be"):
        open_dataset(tmp_path / "imgs", modality="text")


# ------------------------------------------------------------------ class lists


def test_classes_from_comma_list():
    classes = load_classes(" cat, dog ,bird")
    assert classes.names == ["cat", "dog", "bird"]
    assert classes.prompts == {"cat": [], "dog": [], "bird": []}
    assert not classes.has_prompts and len(classes) == 3 and classes.index("dog") == 1


def test_classes_from_line_file(tmp_path):
    (tmp_path / "c.txt").write_text("# my classes\ncat\n\ndog  # pets\nbird\n")
    assert load_classes(str(tmp_path / "c.txt")).names == ["cat", "dog", "bird"]


def test_classes_from_toml_and_json(tmp_path):
    (tmp_path / "c.toml").write_text(
        'cat = "a photo of a cat"\ndog = ["a dog", "a puppy"]\n"t-shirt/top" = []\n'
    )
    classes = load_classes(str(tmp_path / "c.toml"))
    assert classes.names == ["cat", "dog", "t-shirt/top"]
    assert classes.prompts["cat"] == ["a photo of a cat"]
    assert classes.prompts["dog"] == ["a dog", "a puppy"]
    assert classes.has_prompts
    (tmp_path / "n.toml").write_text('[classes]\na = "x"\nb = "y"\n')
    assert load_classes(str(tmp_path / "n.toml")).names == ["a", "b"]
    (tmp_path / "c.json").write_text(json.dumps({"b": "bee", "a": ["ay"]}))
    assert load_classes(str(tmp_path / "c.json")).prompts == {"b": ["bee"], "a": ["ay"]}
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert load_classes(str(tmp_path / "l.json")).names == ["x", "y"]


def test_class_errors(tmp_path):
    with pytest.raises(UserError, match="class 'cat' is listed twice in --classes"):
        load_classes("cat,dog,cat")
    with pytest.raises(UserError, match="gives 1 class.*at least 2"):
        load_classes("cat")
    with pytest.raises(UserError, match="empty class name in --classes"):
        load_classes("cat,,dog")
    with pytest.raises(UserError, match="class file not found: .*missing.toml"):
        load_classes(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("a = ")
    with pytest.raises(UserError, match="is not valid TOML"):
        load_classes(str(tmp_path / "bad.toml"))
    (tmp_path / "bad.json").write_text('{"a": 3, "b": "x"}')
    with pytest.raises(UserError, match="class 'a' in .*bad.json must map to a string"):
        load_classes(str(tmp_path / "bad.json"))
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(UserError, match="class 'a' is listed twice in .*dup.txt"):
        load_classes(str(tmp_path / "dup.txt"))


def test_label_indices(tmp_path):
    data = open_dataset(write_table(tmp_path / "t.csv", ROWS))
    indices = label_indices(data, ClassList(["plant", "animal"], {}))
    assert indices.dtype == np.int64 and indices.tolist() == [1, 0, 1]


def test_unknown_label_names_it_row_and_classes(tmp_path):
    data = open_dataset(write_table(tmp_path / "t.csv", ROWS))
    with pytest.raises(UserError) as info:
        label_indices(data, load_classes("animal,food"))
    message = str(info.value)
    assert "unknown label 'plant'" in message and "row 2 (id 'b2')" in message
    assert "the classes are: animal, food" in message


def test_label_indices_without_labels(tmp_path):
    data = open_dataset(write_table(tmp_path / "t.csv", [{"text": "x"}]))
    with pytest.raises(UserError, match="has no labels: labeled data needs a label column"):
        label_indices(data, load_classes("a,b"))


# ------------------------------------------------------------------ image folders


def make_labeled_folder(root):
    save_png(root / "shirt" / "a.png", "L")
    save_png(root / "shirt" / "deep" / "b.png", "RGB", color=(10, 20, 30))
    save_png(root / "shoe" / "c.png", "P")
    (root / "shoe" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save_png(root / ".hidden" / "x.png")
    return root


def test_labeled_image_folder(tmp_path):
    data = open_dataset(make_labeled_folder(tmp_path / "imgs"), require_labels=True)
    assert isinstance(data, ImageDataset) and data.modality == "image"
    assert data.ids == ["shirt/a.png", "shirt/deep/b.png", "shoe/c.png"]
    assert data.labels == ["shirt", "shirt", "shoe"]
    assert data.paths[2] == tmp_path / "imgs" / "shoe" / "c.png"
    assert [p.name for p in data.paths] == ["a.png", "b.png", "c.png"]
    assert label_indices(data, load_classes("shoe,shirt")).tolist() == [1, 1, 0]


def test_flat_image_folder_is_unlabeled(tmp_path):
    save_png(tmp_path / "b.png")
    save_png(tmp_path / "a.JPG".lower())
    data = open_dataset(tmp_path)
    assert data.ids == ["a.jpg", "b.png"] and data.labels is None


def test_image_conversions_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("LA", (4, 4), (10, 0)).save(tmp_path / "la.png")
    data = open_dataset(tmp_path)
    images = {data.ids[i]: data.load_image(i) for i in range(len(data))}
    assert all(image.mode == "RGB" and image.size == (4, 4) for image in images.values())
    # Transparent pixels become white, opaque ones keep their colour.
    assert images["rgba.png"].getpixel((1, 1)) == (255, 255, 255)
    assert images["rgba.png"].getpixel((0, 0)) == (0, 0, 255)
    assert images["la.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["grey.png"].getpixel((2, 2)) == (77, 77, 77)
    assert images["palette.png"].getpixel((0, 0)) == (200, 100, 50)
    assert max(abs(c - 255) for c in images["cmyk.jpg"].getpixel((0, 0))) <= 2


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    array = np.full((3, 3), 65535 // 2, dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.png")
    pixel = open_dataset(tmp_path).load_image(0).getpixel((0, 0))
    assert pixel[0] == pixel[1] == pixel[2] and 120 <= pixel[0] <= 135


def test_image_folder_streams_lazily(tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png")
    data = open_dataset(tmp_path)  # construction opens no image...
    (tmp_path / "b.png").write_bytes(b"garbage")  # ...so corrupting one afterwards
    assert data.load_image(0).mode == "RGB"  # leaves the other readable
    with pytest.raises(
        UserError, match=r"unreadable image .*b\.png \(id 'b\.png'\).*--skip-corrupt"
    ):
        data.load_image(1)


def test_corrupt_image_default_fails_naming_file(tmp_path):
    save_png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = open_dataset(tmp_path)
    with pytest.raises(UserError) as info:
        data.load_image(data.ids.index("bad.png"))
    assert not isinstance(info.value, CorruptImage)
    assert "bad.png" in str(info.value) and "--skip-corrupt" in str(info.value)
    assert "\n" not in str(info.value)


def test_corrupt_images_skipped_and_counted(tmp_path):
    for name in ["a.png", "c.png"]:
        save_png(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"garbage")
    data = open_dataset(tmp_path, DataOptions(skip_corrupt=True))
    with pytest.raises(CorruptImage, match=r"unreadable image .*b\.png"):
        data.load_image(1)
    skipped = []
    kept = [index for index, _ in iter_images(data, range(len(data)), skipped)]
    assert kept == [0, 2] and skipped == ["b.png"]


def test_deleted_image_is_reported_when_loaded(tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png")
    data = open_dataset(tmp_path)
    (tmp_path / "a.png").unlink()
    with pytest.raises(UserError, match=r"unreadable image .*a\.png"):
        data.load_image(0)


def test_empty_image_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"empty data set: no image files .* found under"):
        open_dataset(tmp_path)


def test_labeled_folder_without_class_subfolders(tmp_path):
    save_png(tmp_path / "a.png")
    with pytest.raises(UserError, match="labeled image folder .* has no class sub-folders"):
        open_dataset(tmp_path, require_labels=True)
    save_png(tmp_path / "cls" / "b.png")
    with pytest.raises(UserError, match="has image 'a.png' outside the class sub-folders"):
        open_dataset(tmp_path, require_labels=True)


def test_image_folder_fingerprint_tracks_files(tmp_path):
    save_png(tmp_path / "a.png", size=(3, 3))
    before = open_dataset(tmp_path).fingerprint()
    assert before == open_dataset(tmp_path).fingerprint()
    save_png(tmp_path / "a.png", size=(30, 30), color=3)
    assert open_dataset(tmp_path).fingerprint() != before


# ------------------------------------------------------------------ image tables


def test_image_table(tmp_path):
    save_png(tmp_path / "imgs" / "x.png")
    save_png(tmp_path / "imgs" / "y.png", "RGBA", color=(0, 0, 0, 0))
    rows = [{"path": "imgs/x.png", "label": "a"}, {"path": "imgs/y.png", "label": "b"}]
    data = open_dataset(write_table(tmp_path / "t.csv", rows))
    assert isinstance(data, ImageDataset)
    assert data.ids == ["imgs/x.png", "imgs/y.png"] and data.labels == ["a", "b"]
    assert data.load_image(1).getpixel((0, 0)) == (255, 255, 255)
    rows = [dict(row, id=f"s{i}") for i, row in enumerate(rows)]
    sub = tmp_path / "sub"
    sub.mkdir()
    rows = [dict(row, path="../" + row["path"]) for row in rows]
    data = open_dataset(write_table(sub / "t.parquet", rows))
    assert data.ids == ["s0", "s1"] and data.paths[0].resolve() == tmp_path / "imgs" / "x.png"


def test_image_table_missing_file_names_row_and_path(tmp_path):
    save_png(tmp_path / "x.png")
    rows = [{"path": "x.png"}, {"path": "gone.png"}]
    with pytest.raises(UserError, match=r"row 2 of .*t.jsonl: image file 'gone.png' not found"):
        open_dataset(write_table(tmp_path / "t.jsonl", rows))


def test_image_modality_needs_path_column(tmp_path):
    with pytest.raises(UserError, match=r"no column 'path' \(columns: text\).*--path-column"):
        open_dataset(write_table(tmp_path / "t.csv", [{"text": "x"}]), modality="image")


def test_image_table_duplicate_ids(tmp_path):
    save_png(tmp_path / "x.png")
    rows = [{"path": "x.png"}, {"path": "x.png"}]
    with pytest.raises(UserError, match=r"duplicate id 'x.png' .*rows 1 and 2"):
        open_dataset(write_table(tmp_path / "t.csv", rows))


def test_construction_opens_no_image(tmp_path, monkeypatch):
    for i in range(3):
        save_png(tmp_path / "cls" / f"{i}.png")
    import PIL.Image

    def forbidden(*args, **kwargs):
        raise AssertionError("an image was opened while building the data set")

    monkeypatch.setattr(PIL.Image, "open", forbidden)
    data = open_dataset(tmp_path, require_labels=True)
    data.fingerprint()
    assert len(data) == 3 and len(list(data.paths)) == 3 and data.paths[-1].name == "2.png"
    assert data.paths[0:2] == [tmp_path / "cls" / "0.png", tmp_path / "cls" / "1.png"]


def test_datasets_pickle_for_loader_workers(tmp_path):
    import pickle

    save_png(tmp_path / "a.png")
    data = pickle.loads(pickle.dumps(open_dataset(tmp_path)))
    assert data.load_image(0).mode == "RGB"


def test_long_csv_field_and_unbalanced_quote(tmp_path):
    long_text = "word " * 40_000  # 200 kB: beyond the csv module's default field limit
    write_table(tmp_path / "t.csv", [{"text": long_text}])
    assert open_dataset(tmp_path / "t.csv").texts == [long_text]
    (tmp_path / "n.csv").write_text('text\nfine\n"unclosed, rest of file\nmore\n')
    with pytest.raises(UserError, match=r"line \d+ of .*n.csv is not valid CSV"):
        open_dataset(tmp_path / "n.csv")


def test_not_utf8(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(UserError, match="t.csv is not UTF-8 text.*save it as UTF-8"):
        open_dataset(tmp_path / "t.csv")


def test_symlinked_folders_followed_without_looping(tmp_path):
    outside = tmp_path / "outside"
    save_png(outside / "x.png")
    root = tmp_path / "data"
    save_png(root / "a" / "y.png")
    (root / "b").symlink_to(outside, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    data = open_dataset(root)
    assert "b/x.png" in data.ids and "a/y.png" in data.ids
    assert sorted(data.ids) == ["a/y.png", "b/x.png"]
