"""`zmdevice export --format ort`: ONNX Runtime's mobile format, loaded by Python onnxruntime."""

from __future__ import annotations

import json
import shutil

import exported_models
import numpy as np
import onnxruntime as ort
import pytest

from zmdevice.config import ExportConfig
from zmdevice.errors import UserError
from zmdevice.exporting.ort_format import write_ort
from zmdevice.exporting.run import run_export
from zmdevice.runtime import OnnxClassifier, load_image, run_predict


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


def copy_model(models, modality: str, folder):
    """Copies of NAME.onnx, NAME.int8.onnx (and the tokenizer) in ``folder``."""
    source = exported_models.model_file(models, f"{modality}_onnx")
    for path in source.parent.glob(source.stem + "*"):
        shutil.copy(path, folder / path.name)
    return folder / source.name, folder / exported_models.model_file(
        models, f"{modality}_int8"
    ).name


@pytest.mark.parametrize("modality", ["image", "text"])
def test_ort_files_reproduce_the_onnx_outputs(models, tmp_path, modality):
    fp32, int8 = copy_model(models, modality, tmp_path)
    written = write_ort([fp32, int8])
    ort_files = [fp32.with_suffix(".ort"), int8.with_suffix(".ort")]
    assert written["files"] == [str(p) for p in ort_files]
    if modality == "image":
        inputs = sorted(p for p in models["image_test"].rglob("*.png"))[::4]
        samples = [load_image(p) for p in inputs]
    else:
        inputs = ["a small dog with a cat", "the red flower of a tree", "Héllo 🐶 中文 " * 20]
        samples = inputs
    for onnx_file, ort_file in zip([fp32, int8], ort_files, strict=True):
        # Python onnxruntime opens the .ort file, with the zmdevice metadata inside
        session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
        metadata = session.get_modelmeta().custom_metadata_map
        assert json.loads(metadata["zmdevice.classes"]) == OnnxClassifier(onnx_file).classes
        reference = OnnxClassifier(onnx_file)
        feed = (
            reference.encode_texts(samples)
            if modality == "text"
            else reference.encode_images(samples)
        )
        want = reference.logits(feed)
        got = session.run(["logits"], feed)[0]
        scale = float(np.abs(want).max())
        assert scale > 1  # a trained student, not near-zero logits
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
        assert written["relative_errors"][ort_file.name] <= 1e-4
        # and `zmdevice predict` takes the .ort file as it takes the .onnx
        shown = run_predict(ort_file, [str(p) for p in inputs], top_k=1)["predictions"]
        expected = run_predict(onnx_file, [str(p) for p in inputs], top_k=1)["predictions"]
        assert [p["top"][0]["class"] for p in shown] == [p["top"][0]["class"] for p in expected]
    # one reduced-operator config for both files: "domain;opset;Op,Op" lines
    config = (tmp_path / f"{fp32.stem}.required_operators.config").read_text(encoding="utf-8")
    assert f"# - {int8.with_suffix('.ort').name}" in config
    rules = [line for line in config.splitlines() if not line.startswith("#")]
    assert rules and all(len(line.split(";")) == 3 for line in rules)
    operators = {op for line in rules for op in line.split(";")[2].split(",")}
    assert ("Conv" in operators or "QLinearConv" in operators) == (modality == "image")
    assert "DequantizeLinear" in operators or "DynamicQuantizeLinear" in operators
    assert not list(tmp_path.glob(".*work"))  # no work folder left behind


def test_export_format_ort_writes_the_mobile_files(models, tmp_path):
    out = tmp_path / "txt.onnx"
    summary = run_export(ExportConfig(model_dir=models["text_dir"], out=out, format="ort"))
    assert summary["ort"]["files"] == [str(tmp_path / "txt.ort")]
    assert (tmp_path / "txt.required_operators.config").is_file()
    assert any(line.startswith("ORT format: ") for line in summary["lines"])
    logits = OnnxClassifier(tmp_path / "txt.ort").logits(["a small dog", "a red tree"])
    np.testing.assert_allclose(
        logits,
        OnnxClassifier(out).logits(["a small dog", "a red tree"]),
        atol=1e-4 * float(np.abs(logits).max()),
    )


def test_unknown_format_is_refused(models):
    with pytest.raises(UserError, match="--format"):
        ExportConfig(model_dir=models["text_dir"], format="tflite")
