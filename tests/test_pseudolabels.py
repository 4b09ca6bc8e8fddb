"""The pseudo-label file: round trips, compression bounds, validation messages, combining."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zmdevice.errors import UserError
from zmdevice.labeling.join import combine_pseudolabels
from zmdevice.pseudolabels import (
    METADATA_KEY,
    PseudoLabelWriter,
    build_metadata,
    read_pseudolabel_metadata,
    read_pseudolabels,
)
from zmdevice.topk import compress_probs, default_top_k


def softmax_rows(rng, n, c, spread):
    z = rng.normal(size=(n, c)) * spread
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def kl(p, q):
    return (p * np.log(p / q)).sum(1)


def write(path, ids, probs, classes=None, **kw):
    classes = classes or [f"c{i}" for i in range(probs.shape[1])]
    meta = build_metadata(
        classes=classes,
        teacher={"spec": "test:x", "name": "x"},
        data={"fingerprint": "f" * 64, "shard": None},
        top_k=kw.pop("top_k", default_top_k(len(classes))),
        **kw,
    )
    with PseudoLabelWriter(path, meta) as writer:
        for start in range(0, len(ids), 7):  # several row groups
            writer.write_probs(ids[start : start + 7], probs[start : start + 7])
    return meta


@pytest.mark.parametrize("num_classes,spread", [(2, 1.0), (10, 3.0), (200, 2.0)])
def test_round_trip_keeps_ids_argmax_and_probs_within_kl_budget(tmp_path, num_classes, spread):
    rng = np.random.default_rng(num_classes)
    probs = softmax_rows(rng, 50, num_classes, spread)
    ids = [f"id{i}" for i in range(50)]
    write(tmp_path / "p.parquet", ids, probs)
    labels = read_pseudolabels(tmp_path / "p.parquet")
    assert labels.ids == ids
    np.testing.assert_array_equal(labels.label, probs.argmax(1))
    dense = labels.dense_probs().astype(np.float64)
    assert dense.shape == probs.shape
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-5)
    assert kl(probs, dense).mean() < 1e-3
    assert np.isfinite(kl(probs, dense)).all()
    assert (labels.topk_idx[:, 0] == labels.label).all()  # most probable first


def test_compress_keeps_one_class_for_a_confident_row_and_all_for_a_uniform_one():
    confident = np.full((1, 10), 1e-7)
    confident[0, 3] = 1 - 9e-7
    rows = compress_probs(confident, top_k=10, max_kl=5e-4)
    assert rows.counts.tolist() == [1] and rows.idx.tolist() == [3]
    uniform = np.full((1, 10), 0.1)
    # a uniform tail costs nothing, so one class suffices even for a uniform row
    assert compress_probs(uniform, top_k=10, max_kl=5e-4).counts.tolist() == [1]
    mixed = np.array([[0.4, 0.3, 0.2, 0.05, 0.05]])
    assert compress_probs(mixed, top_k=5, max_kl=0.0).counts.tolist() == [5]
    assert compress_probs(mixed, top_k=2, max_kl=0.0).counts.tolist() == [2]


def test_stored_heads_never_exceed_one_so_tail_keeps_mass():
    rng = np.random.default_rng(0)
    probs = softmax_rows(rng, 500, 10, 4.0)
    rows = compress_probs(probs, top_k=10, max_kl=5e-4)
    sums = np.add.reduceat(rows.prob.astype(np.float64), np.r_[0, np.cumsum(rows.counts)[:-1]])
    kept_true = np.add.reduceat(
        probs[np.repeat(np.arange(500), rows.counts), rows.idx],
        np.r_[0, np.cumsum(rows.counts)[:-1]],
    )
    assert (sums <= kept_true + 1e-12).all()


def test_file_holds_the_documented_schema_and_metadata(tmp_path):
    probs = softmax_rows(np.random.default_rng(1), 20, 12, 2.0)
    write(tmp_path / "p.parquet", [f"x{i}" for i in range(20)], probs, prompts={"c0": ["p"]})
    schema = pq.read_schema(tmp_path / "p.parquet")
    assert schema.names == ["id", "label", "topk_idx", "topk_prob"]
    assert schema.field("topk_prob").type == pa.list_(pa.float16())
    meta = json.loads(schema.metadata[METADATA_KEY])
    for key in (
        "format_version",
        "zmdevice_version",
        "classes",
        "teacher",
        "prompts",
        "created",
        "data",
        "top_k",
        "quality",
    ):
        assert key in meta
    assert (
        pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    )


def test_select_aligns_by_id_and_reports_missing_ids(tmp_path):
    probs = softmax_rows(np.random.default_rng(2), 5, 3, 1.0)
    write(tmp_path / "p.parquet", list("abcde"), probs)
    labels = read_pseudolabels(tmp_path / "p.parquet")
    picked = labels.select(["e", "a"])
    assert picked.ids == ["e", "a"]
    np.testing.assert_array_equal(picked.label, probs[[4, 0]].argmax(1))
    with pytest.raises(
        UserError, match=r"lacks pseudo-labels for 2 of 3 ids \(e.g. 'x'\).*--allow-partial"
    ):
        labels.select(["a", "x", "y"])
    assert labels.select(["a", "x"], allow_partial=True).ids == ["a"]
    with pytest.raises(UserError, match="p.parquet lacks pseudo-labels for 1 of 1"):
        labels.select(["zz"], allow_partial=True)


def test_reader_rejects_other_classes_and_other_data(tmp_path):
    probs = softmax_rows(np.random.default_rng(3), 4, 3, 1.0)
    write(tmp_path / "p.parquet", list("abcd"), probs, classes=["cat", "dog", "fox"])
    with pytest.raises(UserError, match=r"p.parquet was labeled for other classes \(lacks owl"):
        read_pseudolabels(tmp_path / "p.parquet", classes=["cat", "dog", "owl"])
    with pytest.raises(UserError, match="another order"):
        read_pseudolabels(tmp_path / "p.parquet", classes=["dog", "cat", "fox"])
    labels = read_pseudolabels(tmp_path / "p.parquet", classes=["cat", "dog", "fox"])
    labels.check_fingerprint("f" * 64)
    with pytest.raises(UserError, match="made from other data.*--allow-partial"):
        labels.check_fingerprint("0" * 64)
    labels.check_fingerprint("0" * 64, allow_partial=True)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="pseudo-label file not found: .*nope.parquet"):
        read_pseudolabels(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="junk.parquet is not a Parquet file"):
        read_pseudolabels(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(UserError, match="plain.parquet is a Parquet file without zmdevice"):
        read_pseudolabel_metadata(tmp_path / "plain.parquet")
    probs = softmax_rows(np.random.default_rng(4), 2, 3, 1.0)
    meta = write(tmp_path / "new.parquet", ["a", "b"], probs)
    table = pq.read_table(tmp_path / "new.parquet")
    meta["format_version"] = 99
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    pq.write_table(table, tmp_path / "new.parquet")
    with pytest.raises(UserError, match="format version 99.*upgrade zmdevice"):
        read_pseudolabels(tmp_path / "new.parquet")


def test_interrupted_writer_leaves_no_file(tmp_path):
    probs = softmax_rows(np.random.default_rng(5), 4, 3, 1.0)
    meta = build_metadata(classes=["a", "b", "c"], teacher={}, data={}, top_k=3)
    with pytest.raises(RuntimeError), PseudoLabelWriter(tmp_path / "p.parquet", meta) as writer:
        writer.write_probs(["1", "2"], probs[:2])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_combine_concatenates_shards_and_rejects_mismatch_and_repeats(tmp_path):
    rng = np.random.default_rng(6)
    probs = softmax_rows(rng, 30, 4, 2.0)
    ids = [f"s{i}" for i in range(30)]
    write(tmp_path / "a.parquet", ids[:10], probs[:10], skipped={"count": 1, "examples": ["q"]})
    write(tmp_path / "b.parquet", ids[10:], probs[10:], skipped={"count": 2, "examples": ["r"]})
    write(tmp_path / "whole.parquet", ids, probs)
    meta = combine_pseudolabels(
        [tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "c.parquet"
    )
    assert meta["skipped"]["count"] == 3
    combined = read_pseudolabels(tmp_path / "c.parquet")
    whole = read_pseudolabels(tmp_path / "whole.parquet")
    assert combined.ids == ids
    np.testing.assert_array_equal(combined.dense_probs(), whole.dense_probs())
    with pytest.raises(UserError, match="id 's0' appears in more than one file"):
        combine_pseudolabels(
            [tmp_path / "a.parquet", tmp_path / "a.parquet"], tmp_path / "d.parquet"
        )
    write(tmp_path / "other.parquet", ["z"], softmax_rows(rng, 1, 4, 1.0), classes=list("wxyz"))
    with pytest.raises(UserError, match="their 'classes' differ"):
        combine_pseudolabels(
            [tmp_path / "a.parquet", tmp_path / "other.parquet"], tmp_path / "e.parquet"
        )
    assert not (tmp_path / "d.parquet").exists() and not (tmp_path / "e.parquet").exists()


def test_size_targets_hold_for_peaked_distributions(tmp_path):
    """Guards the encoding: <= 0.5x a float32 .npy at 10 classes, <= 0.15x at 1,000."""
    rng = np.random.default_rng(7)
    for num_classes, spread, count, target in [(10, 4.0, 2000, 0.5), (1000, 6.0, 400, 0.15)]:
        probs = softmax_rows(rng, count, num_classes, spread)
        ids = [f"img_{i:05d}.png" for i in range(count)]
        meta = build_metadata(
            classes=[f"class {i}" for i in range(num_classes)],
            teacher={"spec": "test:x"},
            data={"fingerprint": "f" * 64},
            top_k=default_top_k(num_classes),
        )
        with PseudoLabelWriter(tmp_path / "s.parquet", meta) as writer:
            for start in range(0, count, 256):
                writer.write_probs(ids[start : start + 256], probs[start : start + 256])
        np.save(tmp_path / "s.npy", probs.astype(np.float32))
        ratio = (tmp_path / "s.parquet").stat().st_size / (tmp_path / "s.npy").stat().st_size
        dense = read_pseudolabels(tmp_path / "s.parquet").dense_probs().astype(np.float64)
        assert ratio <= target, (num_classes, ratio)
        assert kl(probs, dense).mean() <= 1e-3
