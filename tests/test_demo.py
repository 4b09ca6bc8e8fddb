"""The README's main job, reduced: label -> train -> export -> predict on the embedded data."""

import json

import pytest
from typer.testing import CliRunner

from zmdevice.cli import app


@pytest.mark.slow
def test_quick_text_demo_runs_the_whole_workflow(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--modality", "text", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # The real MiniLM teacher is far above chance (12.5%) on the 8 WordNet categories.
    assert summary["fm_accuracy"] > 0.4
    # The exported ONNX model is the PyTorch student: same test accuracy up to float noise.
    assert abs(summary["student_accuracy_onnx"] - summary["student_accuracy_torch"]) <= 0.01
    assert abs(summary["student_accuracy_int8"] - summary["student_accuracy_onnx"]) <= 0.05
    assert summary["int8_bytes"] < 0.5 * summary["onnx_bytes"]
    assert (tmp_path / "labels" / "text.parquet").is_file()
    assert (tmp_path / "models" / "text-zeromatch" / "student.safetensors").is_file()
    assert (tmp_path / "export" / "text-zeromatch.onnx").is_file()
    assert any("FM zero-shot" in line for line in summary["lines"])


def test_demo_rejects_an_unknown_modality(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--modality", "audio", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown --modality 'audio'" in result.output


def test_the_demo_runs_its_steps_in_order_and_sums_them_up(tmp_path, monkeypatch):
    """run_demo's named steps, with each stage function replaced by a recorder."""
    from zmdevice.demo import DemoConfig, run_demo

    calls = []

    def stage(name, result):
        return lambda *args, **kwargs: calls.append(name) or result(*args)

    def export(config):
        config.out.parent.mkdir(parents=True)
        config.out.write_bytes(b"x" * 10)
        config.out.with_suffix(".int8.onnx").write_bytes(b"x" * 4)
        return {
            "onnx": str(config.out),
            "int8": {"path": str(config.out.with_suffix(".int8.onnx"))},
        }

    labeled = {"lines": ["labels: few-shot"], "quality": {"accuracy": 0.5}, "label_source": "x"}
    top = {"predictions": [{"input": "a text", "top": [{"class": "c", "probability": 0.9}]}]}
    for path, name, result in [
        ("zmdevice.labeling.run.run_label", "label", lambda config: labeled),
        ("zmdevice.training.run.run_train", "train", lambda config: {"seconds": 2.0}),
        ("zmdevice.exporting.run.run_export", "export", export),
        ("zmdevice.evaluate.run_evaluate_student", "torch", lambda *a: {"accuracy": 0.7}),
        ("zmdevice.runtime.run_evaluate_onnx", "onnx", lambda *a: {"accuracy": 0.7}),
        ("zmdevice.runtime.run_predict", "predict", lambda *a: top),
        ("zmdevice.demo.onnx_latency_ms", "latency", lambda *a: 1.5),
    ]:
        monkeypatch.setattr(path, stage(name, result))
    summary = run_demo(DemoConfig(out=tmp_path, quick=True))
    assert calls == ["label", "label", "train", "export", "torch", "onnx", "onnx", "predict",
                     "latency", "latency"]  # fmt: skip
    assert summary["fm_accuracy"] == 0.5 and summary["student_accuracy_int8"] == 0.7
    assert (summary["onnx_bytes"], summary["int8_bytes"], summary["train_seconds"]) == (10, 4, 2.0)
    assert any("student, ONNX int8" in line for line in summary["lines"])
    assert "-> c (0.90)" in summary["lines"][-3] and "labels: few-shot" in summary["lines"][-2]
