"""Hostile input and a failing environment, through the CLI: one line, exit 2, nothing written.

Every case builds its own small broken input (or environment), runs one ``zmdevice``
command and checks the promise: exit code 2, no traceback, at most two lines on stderr,
the file, row or flag at fault named in the message, and the working folder exactly as it
was before the command (no output, no half-written or temporary file, no changed input).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import exported_models
import numpy as np
import pytest
import torch
from helpers import (
    IMAGE_CLASSES,
    TOPIC_NAMES,
    TOPIC_WORDS,
    snapshot,
    write_pseudolabels,
    write_texts,
)
from PIL import Image
from typer.testing import CliRunner

from zmdevice.cli import app

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def invoke(args: list, cwd: Path | None = None):
    """Run ``zmdevice ARGS`` in-process (in ``cwd`` when given)."""
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def assert_user_error(code: int, stderr: str, *named: str) -> str:
    """Exit 2, one short message without a traceback, naming each of ``named``."""
    # Progress bars (model loading, labeling) are not messages.
    lines = [line for line in stderr.splitlines() if line.strip() and not re.search(r"\d%\|", line)]
    assert code == 2, stderr
    assert "Traceback" not in stderr and "Caught " not in stderr, stderr
    assert 1 <= len(lines) <= 2, stderr
    assert lines[0].startswith("error: "), stderr
    for text in named:
        assert str(text) in stderr, (text, stderr)
    return lines[0]


def check_fails(work: Path, args: list, *named, cwd: Path | None = None) -> str:
    """``zmdevice ARGS`` fails as promised and leaves ``work`` untouched; the message."""
    before = snapshot(work)
    result = invoke(args, cwd)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = assert_user_error(result.exit_code, result.stderr, *named)
    assert snapshot(work) == before, "the failed command changed the working folder"
    return message


def png_header(width: int, height: int) -> bytes:
    """A small PNG file that declares ``width`` x ``height`` grey pixels (a "bomb")."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * 4)  # a few rows; the rest never decodes
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def flip_bytes(path: Path, start: int, count: int = 24) -> None:
    """Damage ``count`` bytes of a file's body in place (footer and magic stay intact)."""
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def read_only_folder(tmp_path: Path) -> Path:
    """A folder no new file can be created in, also for root (who ignores permissions)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys").is_dir():
        pytest.skip("running as root without /sys: no read-only folder to write to")
    return Path("/sys")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory):
    """A tiny timm ImageNet teacher spec (random weights, 2 mapped classes)."""
    import timm

    root = tmp_path_factory.mktemp("image-teacher")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1000)
    torch.save(model.state_dict(), root / "w.pth")
    (root / "map.toml").write_text('cat = ["tabby"]\ndog = ["beagle"]\n')
    return f"imagenet:test_efficientnet:{root / 'w.pth'}:map={root / 'map.toml'}:size=32"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


@pytest.fixture
def work(tmp_path):
    """A working folder with a text table."""
    write_texts(tmp_path / "texts.csv", 40)
    return tmp_path


def label_args(base: list, out, *extra) -> list:
    return [*base, "--out", out, *extra]


@pytest.fixture
def label_base(work, embed_dir):
    """The label command (without --out) for the text table of ``work``."""
    return [
        "label",
        work / "texts.csv",
        "--classes",
        TOPIC_NAMES,
        "--teacher",
        f"text-embed:{embed_dir}",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]


def image_folder(root: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


@pytest.fixture
def text_train(tmp_path):
    """Labeled/unlabeled text tables and a valid pseudo-label file for `zmdevice train`."""
    from zmdevice.data import open_dataset

    names = TOPIC_NAMES.split(",")
    rows = [
        (f"s{i}", f"{TOPIC_WORDS[i % 5]} {TOPIC_WORDS[(i * 3) % 5]}", names[i % 3])
        for i in range(30)
    ]
    (tmp_path / "labeled.csv").write_text(
        "id,text,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows[:6])
    )
    (tmp_path / "unlabeled.csv").write_text("id,text\n" + "".join(f"{a},{b}\n" for a, b, _ in rows))
    unlabeled = open_dataset(tmp_path / "unlabeled.csv")
    write_pseudolabels(
        tmp_path / "labels.parquet", unlabeled.ids, TOPIC_NAMES.split(","), unlabeled.fingerprint()
    )
    return tmp_path


@pytest.fixture
def train_args(text_train):
    """The train command for the tables of ``text_train``."""
    return [
        "train",
        "--labeled",
        text_train / "labeled.csv",
        "--unlabeled",
        text_train / "unlabeled.csv",
        "--pseudo-labels",
        text_train / "labels.parquet",
        "--student",
        "tiny-distilbert",
        "--device",
        "cpu",
        "--kd-steps",
        "1",
        "--ssl-steps",
        "1",
        "--out",
        text_train / "model",
    ]


# --------------------------------------------------------------------------- label runs


def interrupted_run(work: Path, monkeypatch, out: Path, label_base) -> Path:
    """Label until the first part file is written, then stop as if killed; the parts folder."""
    import zmdevice.labeling.run

    monkeypatch.setattr(zmdevice.labeling.run, "CHUNK_BATCHES", 4)  # 8 samples per part
    write_part = zmdevice.labeling.run.write_part

    def write_then_die(*args, **kwargs):
        write_part(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(zmdevice.labeling.run, "write_part", write_then_die)
    result = invoke(label_args(label_base, out))
    assert result.exit_code == 130, result.output  # click's exit code for an interrupt
    monkeypatch.setattr(zmdevice.labeling.run, "write_part", write_part)
    parts = out.with_name(f".{out.name}.parts")
    assert len(list(parts.glob("part-*.parquet"))) == 1
    return parts


@pytest.mark.parametrize("damage", ["garbage", "not-an-object", "no-settings"])
def test_label_resume_with_a_corrupt_run_json_names_it(work, monkeypatch, damage, label_base):
    out = work / "out.parquet"
    parts = interrupted_run(work, monkeypatch, out, label_base)
    text = {"garbage": "{not json", "not-an-object": "[1, 2]", "no-settings": '{"created": "x"}'}
    (parts / "run.json").write_text(text[damage])
    message = check_fails(work, label_args(label_base, out, "--resume"), parts / "run.json")
    assert "delete the folder" in message


def test_label_resume_with_a_corrupt_part_names_it(work, monkeypatch, label_base):
    out = work / "out.parquet"
    parts = interrupted_run(work, monkeypatch, out, label_base)
    part = parts / "part-000000.parquet"
    flip_bytes(part, 8)
    message = check_fails(work, label_args(label_base, out, "--resume"), part)
    assert "--resume" in message


def test_label_combine_with_a_corrupt_shard_names_it(work, label_base):
    out = work / "out.parquet"
    for shard in ("0/2", "1/2"):
        result = invoke(label_args(label_base, out, "--shard", shard))
        assert result.exit_code == 0, result.output
    shard = work / "out.shard-1-of-2.parquet"
    flip_bytes(shard, 8)
    check_fails(work, label_args(label_base, out, "--combine"), shard)


def test_label_combine_with_nan_in_a_shard_names_it(work, label_base):
    from zmdevice.pseudolabels import read_pseudolabel_metadata

    out = work / "out.parquet"
    for shard in ("0/2", "1/2"):
        assert invoke(label_args(label_base, out, "--shard", shard)).exit_code == 0
    shard = work / "out.shard-1-of-2.parquet"
    metadata = read_pseudolabel_metadata(shard)
    metadata.pop("path")
    rewrite_rows(shard, metadata, prob=lambda p: np.full_like(p, np.nan))
    check_fails(work, label_args(label_base, out, "--combine"), shard, "NaN")


def test_label_that_fails_before_any_work_leaves_nothing(work, tmp_path, label_base):
    out = work / "out.parquet"
    args = [*label_base[:5], "text-embed:/no/such/model", *label_base[6:]]
    check_fails(work, [*args, "--out", out], "/no/such/model")
    assert not out.with_name(f".{out.name}.parts").exists()


def test_label_full_disk_names_the_file_and_leaves_nothing(work, monkeypatch, label_base):
    import pyarrow.parquet as pq

    def no_space(self, *args, **kwargs):
        # What pyarrow raises when the disk is full: an OSError without errno or file name.
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", no_space)
    out = work / "out.parquet"
    message = check_fails(work, label_args(label_base, out), "No space left", out.name)
    assert "free some space" in message


def test_label_enospc_with_errno_says_to_free_space(work, monkeypatch, label_base):
    import zmdevice.labeling.run

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(work / "out.parquet"))

    monkeypatch.setattr(zmdevice.labeling.run, "combine_pseudolabels", no_space)
    out = work / "out.parquet"
    before = snapshot(work)
    result = invoke(label_args(label_base, out))
    message = assert_user_error(result.exit_code, result.stderr, out, "No space left on device")
    assert "free some space" in message
    # The finished chunks stay for --resume (that is what they are for); no output file.
    assert not out.exists()
    assert {k for k in snapshot(work) if k not in before} <= {
        f".{out.name}.parts",
        *(f".{out.name}.parts/{p.name}" for p in out.with_name(f".{out.name}.parts").iterdir()),
    }


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("case", ["out-is-folder", "read-only", "parent-is-file"])
def test_label_unwritable_out_fails_before_labeling(work, monkeypatch, case, label_base):
    import zmdevice.labeling.run

    def never(*args, **kwargs):
        raise AssertionError("the teacher ran although the output cannot be written")

    monkeypatch.setattr(zmdevice.labeling.run, "_label_chunks", never)
    if case == "out-is-folder":
        out = work / "folder"
        out.mkdir()
    elif case == "read-only":
        out = read_only_folder(work) / "zmdevice-test" / "out.parquet"
    else:
        (work / "file.txt").write_text("x")
        out = work / "file.txt" / "out.parquet"
    check_fails(work, label_args(label_base, out), "--out", out)


@pytest.mark.parametrize("case", ["out-is-folder", "read-only", "opset-3", "opset-99"])
def test_export_bad_out_or_opset_fails_before_exporting(models, tmp_path, monkeypatch, case):
    import zmdevice.exporting.run

    def never(*args, **kwargs):
        raise AssertionError("the export ran although it was bound to fail")

    monkeypatch.setattr(zmdevice.exporting.run, "export_student", never)
    args, named = ["export", models["image_dir"]], []
    if case == "out-is-folder":
        (tmp_path / "folder.onnx").mkdir()
        args += ["--out", tmp_path / "folder.onnx"]
        named = ["--out", tmp_path / "folder.onnx"]
    elif case == "read-only":
        out = read_only_folder(tmp_path) / "zmdevice-test" / "m.onnx"
        args += ["--out", out]
        named = ["--out", out]
    else:
        opset = case.split("-")[1]
        args += ["--out", tmp_path / "m.onnx", "--opset", opset]
        named = [f"--opset {opset}", "18..23"]
    check_fails(tmp_path, args, *named)


def test_export_opset_below_18_was_written_as_18():
    """Why opsets below 18 are refused: the exporter silently writes 18 for them."""
    from zmdevice.config import SUPPORTED_OPSETS, check_opset
    from zmdevice.errors import UserError

    assert SUPPORTED_OPSETS.start == 18
    for opset in (3, 17, 24):
        with pytest.raises(UserError, match=f"--opset {opset} is not supported"):
            check_opset(opset)
    check_opset(18)


# --------------------------------------------------------------------------- pseudo-labels


def rewrite_rows(path: Path, metadata, *, prob=None, table_change=None, raw_metadata=None):
    """Rewrite a pseudo-label file with changed probabilities, table or metadata bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zmdevice.pseudolabels import METADATA_KEY

    table = pq.read_table(path)
    if prob is not None:
        column = table.column("topk_prob").combine_chunks()
        values = prob(column.values.to_numpy(zero_copy_only=False).astype(np.float16))
        changed = pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.float16()))
        table = table.set_column(table.schema.get_field_index("topk_prob"), "topk_prob", changed)
    if table_change is not None:
        table = table_change(table)
    raw = raw_metadata if raw_metadata is not None else json.dumps(metadata).encode()
    table = table.replace_schema_metadata({METADATA_KEY: raw})
    pq.write_table(table, path, compression="zstd")


def corrupt_pseudolabels(path: Path, damage: str) -> str:
    """Damage a valid pseudo-label file one way; returns what the message must name."""
    import pyarrow as pa

    from zmdevice.pseudolabels import read_pseudolabel_metadata

    metadata = read_pseudolabel_metadata(path)
    metadata.pop("path")
    if damage == "flipped-body":
        flip_bytes(path, 8)
        return "corrupt"
    if damage == "metadata-json":
        rewrite_rows(path, metadata, raw_metadata=b'{"format": "zmdevice-pseudolabels", ')
        return "not valid JSON"
    if damage == "metadata-classes":
        rewrite_rows(path, dict(metadata, classes="sports"))
        return "class list"
    if damage == "nan":
        rewrite_rows(path, metadata, prob=lambda p: np.where(np.arange(len(p)) == 3, np.nan, p))
        return "NaN"
    if damage == "negative":
        rewrite_rows(path, metadata, prob=lambda p: -p)
        return "negative"
    if damage == "sum-above-one":
        rewrite_rows(path, metadata, prob=lambda p: np.minimum(p * 3, 1))
        return "more than 1"
    if damage == "lists-differ":

        def drop_one(table):
            column = table.column("topk_prob").combine_chunks()
            offsets = column.offsets.to_numpy().copy()
            offsets[1:] -= 1
            offsets[1:] = np.maximum(offsets[1:], 0)
            values = column.values.to_numpy(zero_copy_only=False)[: offsets[-1]]
            short = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float16()))
            return table.set_column(3, "topk_prob", short)

        rewrite_rows(path, metadata, table_change=drop_one)
        return "differ in length"
    if damage == "label-type":

        def label_as_text(table):
            labels = pa.array([str(v) for v in table.column("label").to_pylist()])
            return table.set_column(1, "label", labels)

        rewrite_rows(path, metadata, table_change=label_as_text)
        return "column 'label'"
    raise ValueError(damage)


PSEUDO_DAMAGE = [
    "flipped-body",
    "metadata-json",
    "metadata-classes",
    "nan",
    "negative",
    "sum-above-one",
    "lists-differ",
    "label-type",
]


@pytest.mark.parametrize("damage", PSEUDO_DAMAGE)
def test_train_rejects_a_damaged_pseudo_label_file(text_train, damage, train_args):
    path = text_train / "labels.parquet"
    what = corrupt_pseudolabels(path, damage)
    check_fails(text_train, train_args, path, what)


def test_train_on_valid_pseudo_labels_still_starts(text_train, monkeypatch):
    """The checks above are not over-eager: the untouched file passes them."""
    from zmdevice.pseudolabels import read_pseudolabels

    labels = read_pseudolabels(text_train / "labels.parquet")
    assert len(labels) == 30 and np.isfinite(labels.dense_probs()).all()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("size", [(20000, 20000), (11000, 11000)])
def test_label_image_bomb_is_a_corrupt_image(tmp_path, image_teacher, size):
    folder = image_folder(tmp_path / "imgs")
    bomb = folder / "bomb.png"
    bomb.write_bytes(png_header(*size))
    out = tmp_path / "i.parquet"
    args = ["label", folder, "--classes", "cat,dog", "--teacher", image_teacher]
    args += ["--out", out, "--device", "cpu", "--batch-size", "4", "--workers", "0"]
    message = check_fails(tmp_path, args, bomb, "pixels")
    assert "--skip-corrupt" in message
    result = invoke([*args, "--skip-corrupt", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 6 and summary["skipped"] == 1


def test_label_worker_error_is_the_same_one_line_as_without_workers(tmp_path, image_teacher):
    folder = image_folder(tmp_path / "imgs", count=10)
    bad = folder / "5.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "i.parquet"
    args = ["label", folder, "--classes", "cat,dog", "--teacher", image_teacher]
    args += ["--out", out, "--device", "cpu", "--batch-size", "4"]
    without = check_fails(tmp_path, [*args, "--workers", "0"], bad)
    with_workers = check_fails(tmp_path, [*args, "--workers", "2"], bad)
    assert with_workers == without


def test_train_image_bomb_names_the_file_without_a_flag_train_lacks(tmp_path):
    from zmdevice.data import open_dataset

    rng = np.random.default_rng(0)
    for i in range(12):
        label = i % 3
        pixels = rng.integers(0, 80, (20, 20, 3)).astype(np.uint8)
        pixels[..., label] += 150
        for folder in (tmp_path / "unlabeled", tmp_path / "labeled" / IMAGE_CLASSES[label]):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    bomb = tmp_path / "unlabeled" / "999.png"
    bomb.write_bytes(png_header(20000, 20000))
    unlabeled = open_dataset(tmp_path / "unlabeled")
    write_pseudolabels(
        tmp_path / "labels.parquet", unlabeled.ids, IMAGE_CLASSES, unlabeled.fingerprint()
    )
    args = ["train", "--labeled", tmp_path / "labeled", "--unlabeled", tmp_path / "unlabeled"]
    args += ["--pseudo-labels", tmp_path / "labels.parquet", "--student", "tiny-cnn"]
    args += ["--device", "cpu", "--kd-steps", "1", "--ssl-steps", "1", "--out", tmp_path / "m"]
    message = check_fails(tmp_path, args, bomb, "pixels")
    assert "--skip-corrupt" not in message


def test_predict_image_bomb_names_the_file(models, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    check_fails(tmp_path, ["predict", models["image_onnx"], bomb], bomb, "pixels")


# --------------------------------------------------------------------------- model files


def copy_text_model(models, tmp_path) -> Path:
    onnx_path = tmp_path / "txt.onnx"
    shutil.copy(models["text_onnx"], onnx_path)
    tokenizer = Path(models["text_onnx"]).with_name("tiny-txt.tokenizer.json")
    shutil.copy(tokenizer, tmp_path / "tiny-txt.tokenizer.json")
    return onnx_path


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",  # unreadable JSON
        '{"model": 5}',  # JSON, not a tokenizer
        # A tokenizer that loads but cannot encode (its unknown token is not in the vocab).
        json.dumps(
            {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "?"}}
        ),
    ],
)
def test_predict_with_a_corrupt_tokenizer_names_it(models, tmp_path, damage):
    onnx_path = copy_text_model(models, tmp_path)
    tokenizer = tmp_path / "tiny-txt.tokenizer.json"
    tokenizer.write_text(damage)
    check_fails(tmp_path, ["predict", onnx_path, "a dog"], tokenizer)


def test_onnx_with_zmdevice_metadata_but_other_inputs_is_refused(models, tmp_path):
    import onnx

    model = onnx.load(str(models["image_onnx"]))
    for value in model.graph.input:
        if value.name == "pixel_values":
            value.name = "image"
    for node in model.graph.node:
        node.input[:] = ["image" if name == "pixel_values" else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    image = image_folder(tmp_path / "imgs", count=1) / "0.png"
    check_fails(tmp_path, ["predict", renamed, image], renamed, "pixel_values")


# --------------------------------------------------------------------------- data files


def test_non_utf8_classes_file_is_named(work, label_base):
    classes = work / "classes.txt"
    classes.write_bytes("café\nthé\n".encode("latin-1"))
    args = [*label_base, "--out", work / "o.parquet"]
    args[args.index("--classes") + 1] = classes
    check_fails(work, args, classes, "UTF-8")


@pytest.mark.parametrize(
    "spec,file",
    [
        ('cat = "a cat"\n" cat" = "another cat"\ndog = "a dog"\n', "classes.toml"),
        ('["cat", "cat ", "dog"]', "classes.json"),
        ("cat, dog,cat ", None),
    ],
)
def test_class_names_that_differ_only_by_spaces_are_rejected(work, spec, file, label_base):
    if file:
        (work / file).write_text(spec)
        spec = work / file
    args = [*label_base, "--out", work / "o.parquet"]
    args[args.index("--classes") + 1] = spec
    check_fails(work, args, "class 'cat' is listed twice")


@pytest.mark.parametrize(
    "kind,values",
    [
        ("list", [["a", "b"], ["c"]]),
        ("struct", [{"x": "a"}, {"x": "b"}]),
        ("binary", [b"game", b"vote"]),
    ],
)
def test_parquet_text_column_of_nested_type_is_rejected(work, kind, values, label_base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = work / "nested.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": values}), table)
    args = [*label_base, "--out", work / "o.parquet"]
    args[1] = table
    check_fails(work, args, table, "column 'text'", kind)


# --------------------------------------------------------------------------- dependencies

BLOCK_MODULES = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError
from zmdevice.cli import main
sys.argv = ["zmdevice", *{args!r}]
main()
"""


@pytest.mark.parametrize(
    "command,blocked,extra",
    [
        ("train", ["torch"], "train"),
        ("predict", ["onnxruntime"], "runtime"),
        ("export", ["onnx", "onnxscript"], "train"),
    ],
)
def test_missing_optional_dependency_names_the_extra(
    models, text_train, command, blocked, extra, train_args
):
    args = {
        "train": train_args[1:],
        "predict": [models["image_onnx"], models["image_test"]],
        "export": [models["image_dir"], "--out", text_train / "m.onnx"],
    }[command]
    before = snapshot(text_train)
    code = BLOCK_MODULES.format(blocked=blocked, args=[command, *map(str, args)])
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert_user_error(result.returncode, result.stderr, f"pip install 'zmdevice[{extra}]'")
    assert snapshot(text_train) == before


# --------------------------------------------------------------------------- flags


def command_flags() -> dict[str, set[str]]:
    """Command name -> its long flags, read from the typer app."""
    import typer.main

    group = typer.main.get_command(app)
    return {
        name: {
            opt
            for param in command.params
            for opt in (*param.opts, *getattr(param, "secondary_opts", ()))  # --no-X too
            if opt.startswith("--")
        }
        for name, command in group.commands.items()
    }


def test_messages_suggest_only_flags_of_the_running_command(text_train, tmp_path, train_args):
    """Each failure under each command mentions only flags that command has."""
    flags = command_flags()
    (tmp_path / "nolabel.csv").write_text("id,text,name\na,game,sports\nb,vote,politics\n")
    (tmp_path / "notext.csv").write_text("id,body\na,game\n")
    bad_image = image_folder(tmp_path / "imgs", count=3)
    (bad_image / "broken.png").write_bytes(b"not a png")
    cases = [
        # train reads column names from its data, with no --label-column/--text-column flag
        ["train", "--labeled", tmp_path / "nolabel.csv", *train_args[3:]],
        ["train", "--labeled", tmp_path / "notext.csv", *train_args[3:]],
        # evaluate has --label-column and --text-column, but not --id-column
        ["evaluate", text_train / "model", "--data", tmp_path / "nolabel.csv"],
        ["label", tmp_path / "notext.csv", "--classes", TOPIC_NAMES, "--teacher", "minilm"],
        ["label", bad_image, "--classes", "cat,dog", "--teacher", "nope"],
    ]
    for args in cases:
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        mentioned = set(re.findall(r"--[a-z][a-z-]+", result.stderr))
        assert mentioned <= flags[args[0]], (args[0], mentioned - flags[args[0]], result.stderr)


def test_every_flag_named_in_the_code_exists_on_some_command():
    """A static scan: every ``--flag`` written in the package is a real flag of the CLI."""
    # Flags of the tools zmdevice runs or points to: `ray start --head`, torchrun (`train
    # --nproc`), `tensorboard --logdir`, `mlflow ui --backend-store-uri`.
    other_tools = {"--head", "--standalone", "--nproc-per-node", "--logdir", "--backend-store-uri"}
    every = set().union(*command_flags().values(), {"--help"}, other_tools)
    mentioned = set()
    for path in (REPO / "zmdevice").rglob("*.py"):
        # Underscored flags (--output_dir) belong to the ORT converter zmdevice runs.
        mentioned |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+(?!\w)", path.read_text()))
    # A family written as ``--card-*`` must prefix at least one real flag.
    families = {flag for flag in mentioned if flag.endswith("-")}
    assert {f for f in families if not any(real.startswith(f) for real in every)} == set()
    assert mentioned - families - every == set()


def test_flag_hint_follows_the_command():
    from zmdevice.errors import FlagHint, UserError

    error = UserError(
        "bad image x.png", hint=FlagHint("--skip-corrupt", "pass --skip-corrupt", "fix it")
    )
    assert error.render({"--skip-corrupt"}) == "bad image x.png; pass --skip-corrupt"
    assert error.render({"--out"}) == "bad image x.png; fix it"
    assert str(error) == "bad image x.png; pass --skip-corrupt"


# --------------------------------------------------------------------------- summaries


def test_thousands_of_classes_summary_stays_one_screen(work, label_base):
    # 3,000 names print a 40 KB line without truncation; fewer keep the teacher quick.
    names = [f"class{i:05d}" for i in range(3_000)]
    (work / "classes.txt").write_text("\n".join(names) + "\n")
    args = [*label_base, "--out", work / "o.parquet"]
    args[args.index("--classes") + 1] = work / "classes.txt"
    args[1] = write_texts(work / "few.csv", 6)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 400, lines
    assert "more" in result.stdout


def test_classification_report_text_stays_one_screen():
    from zmdevice.metrics import format_report

    names = [f"class{i:05d}" for i in range(10_000)]
    row = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1}
    report = {"accuracy": 0.5, "macro_f1": 0.5, "count": 10_000}
    report["per_class"] = dict.fromkeys(names, row)
    lines = format_report(report, names, "title")
    assert len(lines) <= 24 and lines[-1].endswith("more classes (all with --json)")
