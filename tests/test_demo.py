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
