"""`zmdevice label --engine ray`: the same file as the local engine, resume, errors, sizing.

One local Ray cluster (2 CPUs, like CI) serves the whole module; its session files go to a
temporary folder and it is shut down at the end.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_teachers
import torch
from typer.testing import CliRunner

import zmdevice.labeling.run
from zmdevice.cli import app
from zmdevice.config import DataOptions, LabelConfig
from zmdevice.errors import UserError
from zmdevice.labeling.ray_engine import batch_rows, plan_pool
from zmdevice.labeling.run import run_label
from zmdevice.pseudolabels import read_pseudolabels

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples/default/text"
IMAGES = ROOT / "examples/default/images"
FASHION = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
IMAGENET_NAMES = ["jersey", "jean", "cardigan", "gown", "trench coat", "sandal", "suit"]
IMAGENET_NAMES += ["running shoe", "backpack", "cowboy boot"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    return f"text-embed:{tiny_teachers.make_text_embed(tmp_path_factory.mktemp('embed') / 'm')}"


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("imagenet")
    torch.save(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), folder / "w")
    names = dict(zip(FASHION, IMAGENET_NAMES, strict=True))
    (folder / "map.toml").write_text("".join(f'"{c}" = ["{n}"]\n' for c, n in names.items()))
    return f"imagenet:test_efficientnet:{folder / 'w'}:map={folder / 'map.toml'}:size=32"


@pytest.fixture
def small_chunks(monkeypatch):
    """4 batches per part file, so a few hundred samples make several chunks."""
    monkeypatch.setattr(zmdevice.labeling.run, "CHUNK_BATCHES", 4)


def label(engine, data, classes, teacher, out, **kw):
    return run_label(
        LabelConfig(
            data=data, classes=str(classes), teacher=teacher, out=out, batch_size=16,
            device="cpu" if engine == "local" else "auto", workers=0, engine=engine, **kw,
        )
    )  # fmt: skip


def assert_same_file(a: Path, b: Path) -> None:
    """Same ids in the same order, labels, fp16 probabilities and metadata (but the time)."""
    x, y = read_pseudolabels(a), read_pseudolabels(b)
    assert x.ids == y.ids
    for name in ("label", "topk_idx", "topk_prob"):
        assert getattr(x, name).dtype == getattr(y, name).dtype
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    timing = ("created", "path")
    assert {k: v for k, v in x.metadata.items() if k not in timing} == {
        k: v for k, v in y.metadata.items() if k not in timing
    }


def test_ray_labels_the_default_text_exactly_like_the_local_engine(
    tmp_path, ray_cluster, text_teacher, small_chunks
):
    args = (TEXT / "test.csv", TEXT / "classes.toml", text_teacher)
    local = label("local", *args, tmp_path / "local.parquet")
    ray = label("ray", *args, tmp_path / "ray.parquet", ray_workers=2)
    assert ray["count"] == local["count"] == 400
    assert_same_file(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    assert not (tmp_path / ".ray.parquet.parts").exists()


def test_ray_labels_the_default_images_with_a_corrupt_one_like_the_local_engine(
    tmp_path, ray_cluster, image_teacher, small_chunks
):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(IMAGES / "test", folder)
    (folder / "bag" / "zz-broken.png").write_bytes(b"not a png")
    skip = DataOptions(skip_corrupt=True)
    args = (folder, IMAGES / "classes.toml", image_teacher)
    local = label("local", *args, tmp_path / "local.parquet", data_options=skip)
    ray = label("ray", *args, tmp_path / "ray.parquet", data_options=skip)
    assert ray["count"] == local["count"] == 500 and ray["skipped"] == local["skipped"] == 1
    assert_same_file(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    # Without --skip-corrupt the worker's error reaches the user as the same one line.
    with pytest.raises(UserError, match=r"^unreadable image .*zz-broken.png.*--skip-corrupt"):
        label("ray", *args, tmp_path / "fails.parquet")


def test_resume_after_a_deleted_part_redoes_only_that_chunk(
    tmp_path, ray_cluster, text_teacher, small_chunks, monkeypatch
):
    out, parts = tmp_path / "ray.parquet", tmp_path / ".ray.parquet.parts"
    args = (TEXT / "test.csv", TEXT / "classes.toml", text_teacher, out)
    written = []
    real_write_part = zmdevice.labeling.run.write_part

    def recording_write_part(parts_dir, number, *rest):
        written.append(number)
        real_write_part(parts_dir, number, *rest)

    def crash(*_args, **_kwargs):
        raise RuntimeError("killed before the parts were joined")

    monkeypatch.setattr(zmdevice.labeling.run, "write_part", recording_write_part)
    real_combine = zmdevice.labeling.run.combine_pseudolabels
    monkeypatch.setattr(zmdevice.labeling.run, "combine_pseudolabels", crash)
    with pytest.raises(RuntimeError, match="killed"):
        label("ray", *args)
    assert sorted(written) == list(range(7))  # 400 samples, 64 per chunk
    (parts / "part-000003.parquet").unlink()

    written.clear()
    monkeypatch.setattr(zmdevice.labeling.run, "combine_pseudolabels", real_combine)
    summary = label("ray", *args, resume=True)
    assert written == [3] and summary["count"] == 400
    label("local", *args[:3], tmp_path / "whole.parquet")
    assert_same_file(out, tmp_path / "whole.parquet")


def test_batch_rows_follow_the_local_engine_batches():
    chunks = [range(0, 8), range(8, 16), range(16, 19)]
    images = SimpleNamespace(modality="image")
    by_characters = SimpleNamespace(input_lengths=lambda texts: [len(t) for t in texts])
    rows = batch_rows(images, chunks, [0, 2], 4, by_characters)
    assert [(r["chunk"], r["batch"], r["indices"]) for r in rows] == [
        (0, 0, [0, 1, 2, 3]),
        (0, 1, [4, 5, 6, 7]),
        (2, 0, [16, 17, 18]),
    ]
    # Texts go shortest first inside each chunk, as the local engine feeds them.
    texts = SimpleNamespace(modality="text", texts=["x" * (20 - i) for i in range(19)])
    rows = batch_rows(texts, chunks, [0, 2], 4, by_characters)
    assert [(r["chunk"], r["batch"], r["indices"]) for r in rows] == [
        (0, 0, [7, 6, 5, 4]),
        (0, 1, [3, 2, 1, 0]),
        (2, 0, [18, 17, 16]),
    ]


@pytest.mark.parametrize(
    ("total", "node", "workers", "gpus"),
    [(2, 2, 1, 0), (2, 2, 2, 0), (1, 1, 1, 0), (16, 16, 2, 0), (32, 16, 2, 0), (8, 8, 4, 1)],
)
def test_pool_plan_leaves_cpus_to_the_prepare_stage(total, node, workers, gpus):
    plan = plan_pool(total, node, workers, gpus)
    # Every teacher actor fits on a node beside a prepare actor, and all of them leave room
    # for at least one prepare actor in the cluster: a pool that took every CPU would hang.
    assert 0 < plan.teacher_cpus <= node - plan.prepare_cpus
    assert workers * plan.teacher_cpus + plan.prepare_actors * plan.prepare_cpus <= total + 1e-9
    assert plan.prepare_actors >= 1
    if gpus:
        assert plan.teacher_cpus == 1 and plan.prepare_actors == total - workers


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, text_teacher, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    result = CliRunner().invoke(
        app,
        [
            "label", str(TEXT / "test.csv"), "--classes", str(TEXT / "classes.toml"),
            "--teacher", text_teacher, "--out", str(tmp_path / "x.parquet"), "--engine", "ray",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "zmdevice[ray]" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no parts folder


def test_bad_engine_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--engine 'spark': use one of local, ray"):
        LabelConfig(data=tmp_path, classes="a,b", teacher="minilm", engine="spark")
    with pytest.raises(UserError, match="ray_workers"):
        LabelConfig(data=tmp_path, classes="a,b", teacher="minilm", engine="ray", ray_workers=0)
    with pytest.raises(UserError, match="--device cuda with --engine ray"):
        LabelConfig(data=tmp_path, classes="a,b", teacher="minilm", engine="ray", device="cuda")
