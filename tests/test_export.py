"""`zmdevice export`: one ONNX file, metadata, parity with PyTorch, int8, errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import exported_models
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.config import ExportConfig
from zmdevice.errors import UserError
from zmdevice.exporting.graph import export_student
from zmdevice.exporting.onnx_file import ExportError
from zmdevice.exporting.run import run_export
from zmdevice.runtime import OnnxClassifier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


def graph_inputs(path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(path))
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def test_image_export_is_one_file_with_metadata_and_dynamic_batch(models):
    path = models["image_onnx"]
    summary = models["image_export"]
    assert summary["exporter"] == "dynamo"
    assert list(path.parent.glob("*.data")) == []  # weights inside the .onnx file
    inputs = graph_inputs(path)
    assert list(inputs) == ["pixel_values"]
    assert isinstance(inputs["pixel_values"][0], str) and inputs["pixel_values"][1:] == [3, 16, 16]
    classifier = OnnxClassifier(path)
    assert classifier.classes == exported_models.IMAGE_CLASSES
    assert classifier.metadata["student"] == "tiny-cnn"
    assert classifier.metadata["opset"] == "18"
    assert classifier.preprocess["image_size"] == 16
    assert classifier.preprocess["mean"] == [0.5, 0.5, 0.5]
    for batch in (1, 5):
        logits = classifier.logits({"pixel_values": np.zeros((batch, 3, 16, 16), np.float32)})
        assert logits.shape == (batch, 3)
    # the parity check ran on real training images at several batch sizes
    assert "training samples" in summary["parity"]["inputs"]
    assert [case[0] for case in summary["parity"]["cases"]] == [1, 3, 8]
    assert summary["parity"]["relative_error"] < 1e-4
    assert summary["parity"]["logit_scale"] > 0.1  # a trained student, not ~1e-11 logits


def test_text_export_has_dynamic_length_and_its_tokenizer_beside_it(models):
    from zmdevice.students import load_student

    path = models["text_onnx"]
    inputs = graph_inputs(path)
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for d in inputs["input_ids"])
    classifier = OnnxClassifier(path)
    assert classifier.tokenizer_path() == path.parent / "tiny-txt.tokenizer.json"
    assert classifier.tokenizer_path().is_file()
    assert {c[1] for c in models["text_export"]["parity"]["cases"]} >= {32}
    assert len({c[1] for c in models["text_export"]["parity"]["cases"]}) >= 2
    student = load_student(models["text_dir"])
    rng = np.random.default_rng(0)
    for length in (2, 7, 19):
        ids = rng.integers(5, 60, size=(2, length)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, length // 2 :] = 0
        got = classifier.logits({"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = student(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()))


def test_parity_failure_is_loud_relative_to_tiny_logits_and_writes_nothing(
    models, tmp_path, monkeypatch
):
    import zmdevice.exporting.graph as export_module
    from zmdevice.students import load_student

    student = load_student(models["image_dir"])
    with torch.no_grad():  # logits of ~1e-9: an absolute tolerance would pass anything
        student.head.weight.mul_(1e-9)
        student.head.bias.mul_(1e-9)
    real_trace = export_module._trace_graph

    def trace_a_different_student(model, example, opset):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias.add_(torch.tensor([3e-10, -3e-10, 0.0]))
        return real_trace(other, example, opset)

    monkeypatch.setattr(export_module, "_trace_graph", trace_a_different_student)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ExportError, match="max relative logit error") as error:
        export_student(student, out)
    assert "exceeds" in str(error.value)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temp files left


def test_an_exporter_failure_is_one_export_error_naming_the_student(models, tmp_path, monkeypatch):
    from zmdevice.students import load_student

    def dynamo_breaks(*args, **kwargs):
        raise RuntimeError("simulated dynamo\nfailure")

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="cannot export student .* simulated dynamo failure$"):
        export_student(load_student(models["image_dir"]), out)
    assert not out.exists()


def test_int8_variants_keep_metadata_shrink_and_keep_accuracy(models):
    import onnx

    from zmdevice.runtime import run_evaluate_onnx

    for kind, ops in (("image", {"QuantizeLinear"}), ("text", {"DynamicQuantizeLinear"})):
        fp32 = models[f"{kind}_onnx"]
        int8 = fp32.with_name(fp32.stem + ".int8.onnx")
        summary = models[f"{kind}_export"]["int8"]
        assert summary["path"] == str(int8)
        assert int8.stat().st_size < fp32.stat().st_size
        node_types = {node.op_type for node in onnx.load(str(int8)).graph.node}
        assert ops <= node_types
        quantized, original = OnnxClassifier(int8), OnnxClassifier(fp32)
        assert quantized.classes == original.classes
        assert quantized.preprocess == original.preprocess
        assert "int8" in quantized.metadata["quantization"]
        test = models[f"{kind}_test"]
        accuracy = run_evaluate_onnx(int8, test)["accuracy"]
        assert accuracy >= run_evaluate_onnx(fp32, test)["accuracy"] - 0.1


def test_export_with_test_data_and_calibration_folder_reports_both_accuracies(models, tmp_path):
    out = tmp_path / "calibrated.onnx"
    args = ["export", str(models["image_dir"]), "--out", str(out), "--quantize", "int8"]
    args += ["--test", str(models["image_test"]), "--calibration", str(models["image_test"])]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["int8"]["calibration_images"] == 15  # the --calibration folder's images
    test = summary["test"]
    assert 0.0 <= test["int8_accuracy"] <= 1.0 and 0.0 <= test["fp32_accuracy"] <= 1.0
    expected = 100 * (test["int8_accuracy"] - test["fp32_accuracy"])
    assert test["int8_minus_fp32_points"] == pytest.approx(expected)
    assert any(line.startswith(f"test {models['image_test']}: fp32") for line in summary["lines"])
    assert out.is_file() and out.with_name("calibrated.int8.onnx").is_file()


def test_not_a_trained_student_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a trained student"):
        run_export(ExportConfig(model_dir=tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a trained zmdevice student"):
        run_export(ExportConfig(model_dir=tmp_path))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "is not a folder" in result.output and "Traceback" not in result.output


def test_int8_image_export_without_calibration_data_says_how_to_fix_it(models, tmp_path):
    copied = tmp_path / "student"
    shutil.copytree(models["image_dir"], copied)
    (copied / "train_config.toml").unlink()
    with pytest.raises(UserError, match="--calibration DIR"):
        run_export(ExportConfig(model_dir=copied, out=tmp_path / "x.onnx", quantize="int8"))
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UserError, match="must end in .onnx"):
        run_export(ExportConfig(model_dir=copied, out=tmp_path / "x.bin"))
    with pytest.raises(UserError, match="unknown --quantize 'int4'"):
        ExportConfig(model_dir=copied, quantize="int4")


DEFAULT_DATA = Path(__file__).resolve().parent.parent / "examples" / "default"


@pytest.mark.slow
def test_real_students_export_with_parity_on_the_default_data(tmp_path):
    """MiniLM-initialised DistilBERT (real tokenizer, dynamic length, int8) and MobileNetV3."""
    from zmdevice.classes import load_classes
    from zmdevice.exporting.run import sample_examples
    from zmdevice.students import build_student, recalibrate_batchnorm

    text_classes = load_classes(str(DEFAULT_DATA / "text" / "classes.toml")).names
    texts = sample_examples(DEFAULT_DATA / "text" / "test.csv", "text", 8)
    student = build_student("distilbert", text_classes).eval()
    out = tmp_path / "distilbert.onnx"
    result = export_student(student, out, examples=texts, examples_source="default texts")
    assert result.parity.relative_error < 1e-4
    assert len({case[1] for case in result.parity.cases}) >= 2  # several sequence lengths
    classifier = OnnxClassifier(out)
    ids, mask = student.encode_texts(texts)
    feed = classifier.encode_texts(texts)
    np.testing.assert_array_equal(feed["input_ids"], ids.numpy())
    from zmdevice.exporting.quantize import int8_path, quantize_int8

    quantized = quantize_int8(out, int8_path(out))
    assert quantized["size_bytes"] <= 0.3 * out.stat().st_size
    agree = OnnxClassifier(int8_path(out)).predict_proba(texts).argmax(1)
    assert (agree == classifier.predict_proba(texts).argmax(1)).mean() >= 0.75

    image_classes = load_classes(str(DEFAULT_DATA / "images" / "classes.toml")).names
    images = sample_examples(DEFAULT_DATA / "images" / "unlabeled", "image", 64)
    cnn = build_student("mobilenet_v3_small", image_classes)
    pixels = torch.from_numpy(np.stack([_pre(cnn, image) for image in images]))
    recalibrate_batchnorm(cnn, [pixels[i : i + 16] for i in range(0, 64, 16)])
    result = export_student(cnn.eval(), tmp_path / "cnn.onnx", examples=images[:8])
    assert result.parity.relative_error < 1e-4
    assert result.parity.logit_scale > 1e-4  # BN statistics of real images: not ~1e-11


@pytest.mark.slow
def test_pretrained_efficientnet_lite0_student_exports_with_parity(tmp_path):
    from zmdevice.classes import load_classes
    from zmdevice.exporting.run import sample_examples
    from zmdevice.students import build_student

    classes = load_classes(str(DEFAULT_DATA / "images" / "classes.toml")).names
    images = sample_examples(DEFAULT_DATA / "images" / "unlabeled", "image", 8)
    student = build_student("efficientnet_lite0", classes, preprocess={"image_size": 64})
    result = export_student(student.eval(), tmp_path / "effl0.onnx", examples=images)
    assert result.parity.relative_error < 1e-4
    probs = OnnxClassifier(tmp_path / "effl0.onnx").predict_proba(images)
    assert probs.shape == (8, len(classes))


def _pre(student, image):
    from zmdevice.runtime import preprocess_image

    return preprocess_image(image, student.config["preprocess"])
