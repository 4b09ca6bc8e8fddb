"""benchmarks/bench_gpu.py: skips cleanly without CUDA; its code runs on the CPU."""

import json
import sys
from pathlib import Path

import pytest
import tiny_teachers
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_without_cuda_it_says_so_and_measures_nothing(capsys, tmp_path):
    assert bench_gpu.main(["--json", str(tmp_path / "gpu.json")]) == 0
    assert "no CUDA device here: nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()


def test_the_same_code_runs_on_the_cpu_fp32_against_bf16(tmp_path, capsys):
    arch = tiny_teachers.register_tiny_clip(tmp_path)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--clip-arch", arch, "--batch-size", "4", "--batches", "2",
            "--students", "tiny-mobilenet", "tiny-distilbert", "--steps", "2",
            "--json", str(out)]  # fmt: skip
    assert bench_gpu.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["precision"] for r in result["labeling"]] == ["fp32", "bf16"]
    assert all(r["images_per_s"] > 0 for r in result["labeling"])
    students = [(r["student"], r["precision"]) for r in result["training"]]
    assert students == [
        ("tiny-mobilenet", "fp32"),
        ("tiny-mobilenet", "bf16"),
        ("tiny-distilbert", "fp32"),
        ("tiny-distilbert", "bf16"),
    ]
    assert all(r["step_s"] > 0 and r["speedup_vs_fp32"] > 0 for r in result["training"])
    assert "steps/s" in capsys.readouterr().out
