"""Precision and runtime: the decision table on faked hardware, autocast, ONNX teachers."""

from pathlib import Path

import numpy as np
import pytest
import tiny_teachers
import torch
from helpers import TOPIC_NAMES, text_config, weights, write_texts
from PIL import Image

from zmdevice import precision as precision_module
from zmdevice.classes import ClassList
from zmdevice.errors import UserError
from zmdevice.precision import (
    Hardware,
    Precision,
    choose_precision,
    choose_runtime,
    cpu_bf16_flags,
    model_family,
)
from zmdevice.teachers import build_teacher, teacher_class

torch.set_num_threads(1)
TOPICS = ClassList(["sports", "politics", "science"], {})
CPU_AVX2 = Hardware("cpu")
CPU_BF16 = Hardware("cpu", cpu_bf16=True)
AMPERE = Hardware("cuda", cuda_bf16=True)
TURING = Hardware("cuda", cuda_bf16=False)


@pytest.mark.parametrize(
    ("hardware", "family", "expected"),
    [
        (CPU_BF16, "transformer", "bf16"),
        (CPU_AVX2, "transformer", "fp32"),
        (CPU_BF16, "convnet", "fp32"),  # bf16 measured 2.6x slower for MobileNetV3
        (CPU_AVX2, "convnet", "fp32"),
        (AMPERE, "transformer", "bf16"),
        (AMPERE, "convnet", "bf16"),
        (TURING, "convnet", "fp16"),
        (Hardware("mps"), "transformer", "fp32"),
    ],
)
def test_auto_decision_table(hardware, family, expected):
    chosen = choose_precision("auto", hardware, family)
    assert chosen.name == expected and chosen.device_type == hardware.device_type
    assert chosen.reason.startswith("auto: ")
    # Only fp16 needs loss scaling; bf16 keeps fp32's exponent range.
    assert chosen.needs_grad_scaler == (expected == "fp16")


def test_explicit_precision_is_honoured_with_a_warning_where_it_is_slow():
    slow = choose_precision("bf16", CPU_AVX2, "transformer")
    assert slow.name == "bf16" and "no bf16 instructions" in slow.reason
    assert choose_precision("bf16", CPU_BF16, "convnet").reason == "asked for"
    assert choose_precision("fp32", AMPERE, "transformer").name == "fp32"
    assert choose_precision("fp16", TURING, "transformer").name == "fp16"
    with pytest.raises(UserError, match="--precision fp16 is for GPUs"):
        choose_precision("fp16", CPU_BF16, "transformer")
    with pytest.raises(UserError, match="unknown --precision 'int4'"):
        choose_precision("int4", CPU_BF16, "transformer")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n\nflags : avx2\n")
    assert cpu_bf16_flags(info) == ("avx512_bf16",)
    info.write_text("flags : fpu avx avx2\n")
    assert cpu_bf16_flags(info) == ()
    assert cpu_bf16_flags(tmp_path / "missing") == ()


def test_model_family_tells_transformers_from_convnets():
    from zmdevice.students import build_student

    assert model_family(build_student("tiny-distilbert", ["a", "b"])) == "transformer"
    assert model_family(build_student("tiny-mobilenet", ["a", "b"])) == "convnet"
    attention_pool = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) for _ in range(4)])
    attention_pool.append(torch.nn.MultiheadAttention(3, 1))  # as CLIP's ResNets
    assert model_family(attention_pool) == "convnet"
    patch_embedding = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    patch_embedding.extend(torch.nn.MultiheadAttention(3, 1) for _ in range(2))  # a ViT
    assert model_family(patch_embedding) == "transformer"


def test_autocast_runs_matrix_products_in_the_chosen_dtype_and_fp32_untouched():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with Precision("bf16", "cpu", "test").autocast():
        assert layer(x).dtype == torch.bfloat16
    with Precision("fp32", "cpu", "test").autocast():
        assert layer(x).dtype == torch.float32
    assert not Precision("bf16", "cpu", "test").grad_scaler().is_enabled()


@pytest.mark.parametrize(
    ("requested", "device", "kind", "precision", "expected"),
    [
        ("auto", "cpu", "text-embed", "auto", "onnx"),
        ("auto", "cpu", "imagenet", "fp32", "onnx"),
        ("auto", "cpu", "text-embed", "bf16", "torch"),  # an explicit bf16 stays in torch
        ("auto", "cpu", "clip", "auto", "torch"),
        ("auto", "cuda", "text-embed", "auto", "torch"),
        ("torch", "cpu", "text-embed", "auto", "torch"),
        ("onnx", "cpu", "imagenet", "auto", "onnx"),
        ("onnx-int8", "cpu", "text-embed", "auto", "onnx-int8"),  # only when asked for
        ("auto", "cpu-bf16", "text-embed", "auto", "torch"),  # bf16 autocast there
        ("auto", "cpu-bf16", "text-embed", "fp32", "onnx"),
        ("auto", "cpu-bf16", "imagenet", "auto", "onnx"),  # convnets stay fp32
        ("onnx", "cpu-bf16", "text-embed", "auto", "onnx"),
    ],
)
def test_runtime_decision_table(requested, device, kind, precision, expected):
    hardware = Hardware("cpu", cpu_bf16=True) if device == "cpu-bf16" else Hardware(device)
    assert choose_runtime(requested, hardware, teacher_class(kind), precision) == expected


def test_runtime_errors_name_the_flag():
    nli, imagenet, embed = (teacher_class(k) for k in ("nli", "imagenet", "text-embed"))
    cpu, cuda = Hardware("cpu"), Hardware("cuda")
    with pytest.raises(
        UserError, match=r"--runtime onnx: not for nli teachers \(they run in torch\)"
    ):
        choose_runtime("onnx", cpu, nli, "auto")
    with pytest.raises(UserError, match="--runtime onnx-int8: not for imagenet teachers"):
        choose_runtime("onnx-int8", cpu, imagenet, "auto")
    with pytest.raises(UserError, match="--runtime onnx runs teachers on the CPU"):
        choose_runtime("onnx", cuda, embed, "auto")
    with pytest.raises(UserError, match="--runtime onnx runs in fp32: drop --precision bf16"):
        choose_runtime("onnx", cpu, embed, "bf16")
    with pytest.raises(UserError, match="unknown --runtime 'tvm'"):
        choose_runtime("tvm", cpu, embed, "auto")


# ----------------------------------------------------------------------------- teachers


@pytest.fixture()
def embed(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    return tiny_teachers.make_text_embed(tmp_path / "embed")


TEXTS = ["the game team ball", "vote law", "atom cell", "a much longer text about the game"]


def test_onnx_text_teacher_matches_torch_and_is_cached_once(embed, tmp_path):
    spec = f"text-embed:{embed}"
    eager = build_teacher(spec, TOPICS, precision="fp32", runtime="torch")
    onnx = build_teacher(spec, TOPICS, runtime="onnx")
    assert (eager.info["runtime"], eager.info["precision"]) == ("torch", "fp32")
    assert (onnx.info["runtime"], onnx.info["precision"]) == ("onnx", "fp32")
    # Batches of other sizes and lengths than the export's example: the axes are dynamic.
    for texts in (TEXTS, TEXTS[:1]):
        torch.testing.assert_close(
            onnx.predict_items(texts), eager.predict_items(texts), atol=1e-5, rtol=1e-4
        )
    cached = list((tmp_path / "cache" / "teachers").glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    build_teacher(spec, TOPICS, runtime="onnx")  # reuses the file, does not export again
    assert cached[0].stat().st_mtime_ns == stamp
    assert list(cached[0].parent.iterdir()) == cached  # no temporary file left behind


def test_int8_text_teacher_is_cached_beside_the_fp32_export(embed, tmp_path):
    spec = f"text-embed:{embed}"
    onnx = build_teacher(spec, TOPICS, runtime="onnx")
    int8 = build_teacher(spec, TOPICS, runtime="onnx-int8")
    assert (int8.info["runtime"], int8.info["precision"]) == ("onnx-int8", "fp32")
    cache = tmp_path / "cache" / "teachers"
    fp32_file = next(p for p in cache.glob("*.onnx") if not p.name.endswith(".int8.onnx"))
    int8_file = fp32_file.with_name(fp32_file.stem + ".int8.onnx")
    # Quantised weights: a smaller file than the fp32 export it came from.
    assert int8_file.is_file() and int8_file.stat().st_size < fp32_file.stat().st_size
    assert sorted(p.name for p in cache.iterdir()) == sorted([fp32_file.name, int8_file.name])
    got, expected = int8.predict_items(TEXTS), onnx.predict_items(TEXTS)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.sum(1), torch.ones(len(TEXTS)))
    assert not torch.equal(got, expected)  # it does run the quantised file


def test_bf16_teacher_keeps_labels_and_fp32_outputs(embed):
    spec = f"text-embed:{embed}"
    eager = build_teacher(spec, TOPICS, precision="fp32", runtime="torch")
    bf16 = build_teacher(spec, TOPICS, precision="bf16", runtime="torch")
    assert bf16.info["precision"] == "bf16" and bf16.info["runtime"] == "torch"
    got, expected = bf16.predict_items(TEXTS), eager.predict_items(TEXTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(1), torch.ones(len(TEXTS)))
    assert (got - expected).abs().max() < 0.05  # bf16 keeps ~3 significant digits
    assert not torch.equal(got, expected)  # and it did run in bf16


def test_auto_on_a_bf16_cpu_picks_bf16_for_a_torch_transformer(embed, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    teacher = build_teacher(f"text-embed:{embed}", TOPICS, precision="auto", runtime="torch")
    assert teacher.info["precision"] == "bf16"
    assert teacher.info["precision_reason"].startswith("auto: transformer")
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    teacher = build_teacher(f"text-embed:{embed}", TOPICS, precision="auto", runtime="torch")
    assert teacher.info["precision"] == "fp32"


def test_a_damaged_cached_export_is_a_one_line_error(embed, tmp_path):
    build_teacher(f"text-embed:{embed}", TOPICS, runtime="onnx")
    (cached,) = (tmp_path / "cache" / "teachers").glob("*.onnx")
    cached.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match=r"cannot load the cached teacher .*delete it"):
        build_teacher(f"text-embed:{embed}", TOPICS, runtime="onnx")


def test_an_export_that_disagrees_with_torch_is_never_kept(embed, tmp_path, monkeypatch):
    from zmdevice import onnx_teacher

    monkeypatch.setattr(onnx_teacher, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(UserError, match="disagrees with PyTorch.*--runtime torch"):
        build_teacher(f"text-embed:{embed}", TOPICS, runtime="onnx")
    assert not list((tmp_path / "cache" / "teachers").iterdir())


def test_onnx_imagenet_teacher_matches_torch(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "map.toml").write_text('[map]\ncat = ["tabby", 282]\ndog = ["beagle", "pug"]\n')
    spec = f"imagenet:test_efficientnet:{tmp_path / 'w.pth'}:map={tmp_path / 'map.toml'}:size=32"
    classes = ClassList(["cat", "dog"], {})
    rng = np.random.default_rng(0)
    batch = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    eager = build_teacher(spec, classes, runtime="torch")
    onnx = build_teacher(spec, classes, runtime="auto")  # auto on a CPU: onnx
    assert onnx.info["runtime"] == "onnx" and eager.info["precision"] == "fp32"
    torch.testing.assert_close(
        onnx.predict_items(batch), eager.predict_items(batch), atol=1e-5, rtol=1e-4
    )
    # New weights are a new cache entry, never the old export.
    torch.manual_seed(1)
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "w.pth")
    build_teacher(spec, classes, runtime="onnx")
    assert len(list(Path(tmp_path / "cache" / "teachers").glob("*.onnx"))) == 2


# ----------------------------------------------------------------------------- label


def label_config(tmp_path, embed, **values):
    from zmdevice.config import LabelConfig

    settings = dict(
        data=write_texts(tmp_path / "texts.csv", 24),
        classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed}",
        out=tmp_path / "out.parquet",
        batch_size=4,
        device="cpu",
        workers=0,
    )
    return LabelConfig(**{**settings, **values})


def test_label_records_what_ran_and_onnx_labels_like_torch(embed, tmp_path, monkeypatch):
    from zmdevice.labeling.run import run_label
    from zmdevice.pseudolabels import read_pseudolabels

    # A CPU without bf16 instructions, whatever this one has: auto then stays fp32 in torch.
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    onnx = run_label(label_config(tmp_path, embed))  # auto on a CPU: onnx, fp32
    assert (onnx["precision"], onnx["runtime"]) == ("fp32", "onnx")
    assert "(fp32, onnx runtime, 0 loader workers)" in onnx["lines"][1]
    eager = run_label(
        label_config(tmp_path, embed, out=tmp_path / "eager.parquet", runtime="torch")
    )
    assert (eager["precision"], eager["runtime"]) == ("fp32", "torch")
    a, b = (
        read_pseudolabels(tmp_path / "out.parquet"),
        read_pseudolabels(tmp_path / "eager.parquet"),
    )
    assert (
        a.metadata["teacher"]["runtime"] == "onnx" and b.metadata["teacher"]["runtime"] == "torch"
    )
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.dense_probs(), b.dense_probs(), atol=2e-3)


def test_bad_precision_and_runtime_flags_are_one_line_errors(tmp_path):
    from zmdevice.config import LabelConfig, TrainConfig, load_config

    flags = {"data": tmp_path, "classes": "a,b", "teacher": "minilm"}
    with pytest.raises(UserError, match="--precision: precision must be one of auto, fp32, bf16"):
        load_config(LabelConfig, None, {**flags, "precision": "fp8"})
    with pytest.raises(UserError, match="--runtime: runtime must be one of auto, torch, onnx"):
        load_config(LabelConfig, None, {**flags, "runtime": "jit"})
    train_flags = {"labeled": tmp_path, "unlabeled": tmp_path, "precision": "half"}
    with pytest.raises(UserError, match="--precision: precision must be one of"):
        load_config(TrainConfig, None, train_flags)


def test_resume_keeps_the_precision_its_parts_recorded(embed, tmp_path, monkeypatch):
    from zmdevice.labeling import run as label_module
    from zmdevice.labeling.run import run_label

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the last part, before the final file

    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(label_module, "combine_pseudolabels", fail)
    with pytest.raises(KeyboardInterrupt):
        run_label(label_config(tmp_path, embed, runtime="torch"))  # auto -> bf16 here
    monkeypatch.undo()
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    # Explicitly another precision than the parts': refused.
    with pytest.raises(UserError, match=r"--resume: .* precision bf16.*pass --precision bf16"):
        run_label(label_config(tmp_path, embed, runtime="torch", precision="fp32", resume=True))
    # auto on a CPU without bf16 would resolve fp32; a resume keeps the parts' bf16.
    summary = run_label(label_config(tmp_path, embed, runtime="torch", resume=True))
    assert summary["count"] == 24 and summary["precision"] == "bf16"


# ----------------------------------------------------------------------------- train


def test_bf16_training_resumes_exactly_and_records_its_precision(text_data, tmp_path):  # noqa: F811
    import tomllib

    from zmdevice.training.run import run_train

    summary = run_train(text_config(text_data, tmp_path / "full", precision="bf16"))
    assert summary["precision"] == "bf16"
    assert any(line.startswith("  precision bf16 (asked for") for line in summary["lines"])
    recorded = tomllib.loads((tmp_path / "full" / "train_config.toml").read_text())
    assert recorded["precision"] == "bf16"
    assert "precision bf16" in (tmp_path / "full" / "report.md").read_text()

    # Exact resume within one precision: stopped in stage 2, resumed, same weights.
    run_train(text_config(text_data, tmp_path / "split", precision="bf16", stop_after=13))
    run_train(text_config(text_data, tmp_path / "split", precision="bf16", resume=True))
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(full[key], split[key]) for key in full)

    # Not across precisions: auto resolves to fp32 on this CPU, the checkpoint is bf16.
    run_train(text_config(text_data, tmp_path / "other", precision="bf16", stop_after=5))
    with pytest.raises(UserError, match=r"precision 'fp32' \(checkpoint 'bf16'\)"):
        run_train(text_config(text_data, tmp_path / "other", precision="fp32", resume=True))

    # bf16 really ran: the weights differ from an fp32 run's.
    fp32 = run_train(text_config(text_data, tmp_path / "fp32", precision="fp32"))
    assert fp32["precision"] == "fp32"
    other = weights(tmp_path / "fp32")
    assert not all(torch.equal(full[key], other[key]) for key in full)


def test_auto_precision_of_a_training_run_follows_the_cpu(
    text_data,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from zmdevice.training.run import run_train

    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    summary = run_train(text_config(text_data, tmp_path / "bf16cpu", kd_steps=2, ssl_steps=2))
    assert summary["precision"] == "bf16"
    assert summary["precision_reason"] == "auto: transformer on a CPU with bf16 instructions"
