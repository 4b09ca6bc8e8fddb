"""benchmarks/performance.py: the page rendered from a synthetic report marks targets right."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "performance", ROOT / "benchmarks" / "performance.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


performance = _load()


def train_result(student, ratio, rss, rss_target):
    return {
        "student": student,
        "batch": "16 labeled + 64 unlabeled weak + 64 unlabeled strong",
        "threads": 2,
        "step_s": 0.1 * ratio,
        "bare_forward_backward_s": 0.1,
        "ratio": ratio,
        "ratio_target": 1.15,
        "peak_rss_gb": rss,
        "rss_target_gb": rss_target,
        "weights_bytes": 6_000_000,
        "resume_checkpoint_bytes": 20_000_000,
    }


def export_result(student, fp32_over_torch, delta_points):
    return {
        "student": student,
        "threads": 1,
        "torch_ms": 10.0,
        "onnx_fp32_ms": 10.0 * fp32_over_torch,
        "onnx_int8_ms": 2.0,
        "fp32_over_torch": fp32_over_torch,
        "fp32_bytes": 4_000_000,
        "int8_bytes": 1_000_000,
        "int8_over_fp32_size": 0.25,
        "fp32_accuracy": 0.8,
        "int8_accuracy": 0.8 + delta_points / 100,
        "int8_minus_fp32_points": delta_points,
        "predict_s": 0.9,
        "interpreter_s": 0.02,
        "beyond_interpreter_s": 0.88,
        "checkpoint_bytes": 6_100_000,
        "model_dir_bytes": 6_200_000,
        "tokenizer_bytes": None,
        "process_peak_rss_gb": 1.1,
        # as JSON stores bench_export.TARGETS: lists, not tuples
        "targets": {
            "fp32_over_torch": ["<=", 0.5],
            "int8_over_fp32_size": ["<=", 0.3],
            "int8_minus_fp32_points": ["within", 1.0],
            "beyond_interpreter_s": ["<", 1.0],
        },
    }


def job(name, result, returncode=0):
    return {
        "name": name,
        "argv": ["python", f"benchmarks/bench_{name.split('-')[0]}.py"],
        "returncode": returncode,
        "wall_s": 1.0,
        "cpu_s": 1.5,
        "tree_peak_rss_gb": 1.2,
        "result": result,
        **({"error": "Traceback: boom"} if returncode else {}),
    }


@pytest.fixture
def report():
    label = {
        "batch_size": 64,
        "threads": 2,
        "throughput": [
            {
                "teacher": "minilm",
                "items": 512,
                "classes": 8,
                "end_to_end_per_s": 95.0,
                "bare_forward_per_s": 100.0,
                "ratio": 1.4,
                "ratio_target": 1.5,  # the fast-path target: missed
                "label_agreement": 0.999,
                "agreement_target": 0.995,
                "precision": "fp32",
                "runtime": "onnx",
                "file_bytes": 20_000,
                "bytes_per_sample": 39.1,
                "float32_bytes_per_sample": 32,
            }
        ],
        "sizes": [
            {
                "name": "peaked_10",
                "classes": 10,
                "samples": 5000,
                "file_bytes": 120_000,
                "npy_bytes": 200_128,
                "ratio": 0.6,  # above the 0.5 target
                "ratio_target": 0.5,
                "mean_kl": 2e-4,
                "kl_target": 1e-3,
                "kept_classes": 3.0,
            },
            {
                "name": "eight_classes",
                "classes": 8,
                "samples": 100,
                "file_bytes": 3000,
                "npy_bytes": 3328,
                "ratio": 0.9,
                "ratio_target": None,  # no target at 8 classes
                "mean_kl": 5e-3,  # above the KL target
                "kl_target": 1e-3,
                "kept_classes": 8.0,
            },
        ],
        "peak_rss_gb": 1.4,
        "loader_workers_peak_rss_gb": 0.3,
    }
    return {
        "format": performance.FORMAT,
        "format_version": performance.FORMAT_VERSION,
        "mode": "full",
        "budget": {},
        "command": "python benchmarks/performance.py",
        "started": "2025-01-01T00:00:00Z",
        "finished": "2025-01-01T00:20:00Z",
        "environment": {
            "cpu": "Test CPU",
            "cores": 2,
            "usable_cores": 2,
            "memory_gb": 8.0,
            "os": "Linux",
            "python": "3.11.7",
            "zmdevice": "0.1.0",
            "torch": "2.14.1",
            "torchvision": "0.29.1",
            "transformers": "5.0",
            "onnx": "1.18",
            "onnxruntime": "1.22",
            "thread_env": {},
            "git_commit": "abc123",
            "interpreter": "/usr/bin/python3",
            "git_modified_files": ["zmdevice/training/run.py"],
        },
        "load_average_start": [1.0, 1.0, 1.0],
        "load_average_end": [2.0, 1.5, 1.0],
        "jobs": [
            job("label", label),
            job(
                "train",
                [
                    train_result("mobilenet_v3_small", ratio=1.10, rss=2.5, rss_target=2.0),
                    train_result("distilbert", ratio=1.15, rss=2.9, rss_target=3.0),
                    {
                        "student": "tiny",
                        "error": "boom",
                        "ratio_target": 1.15,
                        "rss_target_gb": None,
                    },
                ],
            ),
            job("export-mobilenet_v3_small", [export_result("mobilenet_v3_small", 0.4, -1.5)]),
            job("export-distilbert", None, returncode=1),
        ],
    }


def statuses(report):
    """{(subject prefix, quantity): status} of every row with a target."""
    return {
        (row.subject.split(" ")[0], row.quantity): row.status
        for _, _, rows in performance.sections(report)
        for row in rows
        if row.target is not None
    }


def test_targets_are_judged_on_the_right_side(report):
    got = statuses(report)
    assert got[("minilm", "ratio end-to-end / bare")] == "missed"  # 1.4 < 1.5
    agreement = "labels equal to the bare pass's (%; teacher ran fp32, onnx)"
    assert got[("minilm", agreement)] == "met"  # 99.9 >= 99.5
    assert got[("mobilenet_v3_small", "ratio step / bare")] == "met"  # 1.10 <= 1.15
    assert got[("distilbert", "ratio step / bare")] == "met"  # equal to the target
    assert got[("mobilenet_v3_small", "training process peak RSS (GB)")] == "missed"  # 2.5 > 2
    assert got[("distilbert", "training process peak RSS (GB)")] == "met"
    assert got[("peaked_10", "file / float32 .npy")] == "missed"
    assert ("eight_classes", "file / float32 .npy") not in got  # no target: not judged
    assert got[("eight_classes", "mean KL(full ‖ stored) (nats)")] == "missed"
    assert got[("mobilenet_v3_small", "ratio onnxruntime fp32 / PyTorch")] == "met"
    assert got[("mobilenet_v3_small", "int8 - fp32 accuracy (points)")] == "missed"  # |-1.5|>1
    assert got[("mobilenet_v3_small", "ratio int8 / fp32")] == "met"
    assert got[("tiny", "ratio step / bare")] == "not measured"  # its run failed


def test_judge_boundaries():
    assert performance.judge(1.0, "<", 1.0) == "missed"
    assert performance.judge(1.0, "<=", 1.0) == "met"
    assert performance.judge(0.9, ">=", 0.9) == "met"
    assert performance.judge(-1.0, "within", 1.0) == "met"
    assert performance.judge(1.01, "within", 1.0) == "missed"
    assert performance.judge(None, "<=", 1.0) == "not measured"


def test_page_marks_missed_targets_and_failed_jobs(report, tmp_path):
    stored = tmp_path / "performance.json"
    stored.write_text(json.dumps(report))  # the page must render from the JSON round trip
    page = tmp_path / "PERFORMANCE.md"
    assert performance.main(["render", "--json", str(stored), "--page", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    judged = list(statuses(report).values())
    met, missed = judged.count("met"), judged.count("missed")
    assert (met, missed) == (8, 5)
    assert judged.count("not measured") == 1
    assert f"**Targets: {met} met, {missed} missed, 1 not measured**" in text
    assert "- not measured: tiny, ratio step / bare" in text
    assert "| 2.50 | ≤ 2 GB | **missed** |" in text
    assert "| -1.50 | within ±1 point | **missed** |" in text
    assert "job `export-distilbert` failed (exit 1)" in text
    assert "`zmdevice/training/run.py`" in text  # uncommitted code is named
    assert "Test CPU" in text and "torch 2.14.1" in text and "onnxruntime 1.22" in text
    assert "`python benchmarks/bench_label.py`" in text
    assert "Quick mode" not in text


def test_render_without_json_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert performance.main(["render", "--json", str(missing)]) == 2
    assert "not found" in capsys.readouterr().out


def precision_result():
    def teacher(name, variant, ratio, agreement, default):
        return {"teacher": name, "variant": variant, "default": default, "items": 256,
                "batch_size": 64, "items_per_s": 100 * ratio, "ratio_to_fp32_eager": ratio,
                "label_agreement": agreement, "max_abs_prob_diff": 1e-6,
                "same_fp16_share": 0.99}  # fmt: skip

    def student(name, precision, speedup, default):
        return {"student": name, "precision": precision, "default": default, "batch": 48,
                "steps": 8, "step_s": 1 / speedup, "speedup_vs_fp32": speedup}  # fmt: skip

    return {
        "cpu_bf16_flags": [],
        "cpu_capability": "AVX2",
        "threads": 2,
        "agreement_target": 0.995,
        "teachers": [
            teacher("minilm", "torch fp32", 1.0, 1.0, False),
            teacher("minilm", "torch bf16", 0.3, 0.99, False),  # not the default: not judged
            teacher("minilm", "onnx fp32", 1.3, 0.999, True),
        ],
        "students": [
            student("distilbert", "fp32", 1.0, True),
            student("distilbert", "bf16", 0.4, False),
        ],
    }


def test_precision_rows_judge_only_the_default_variant(report):
    report = {**report, "jobs": [*report["jobs"], job("precision", precision_result())]}
    got = statuses(report)
    # A teacher variant's speed is information (the label job judges the whole run's);
    # only the default variant's agreement is judged.
    assert ("minilm", "ratio to fp32 eager") not in got
    assert got[("minilm", "labels agreeing with fp32 eager (%)")] == "met"  # 99.9 >= 99.5
    assert got[("distilbert", "speed-up over fp32 eager")] == "missed"  # fp32 default: 1.0
    rows = [r for _, _, rows in performance.sections(report) for r in rows]
    judged = {r.subject for r in rows if r.target and r.quantity.startswith("labels agreeing")}
    assert judged == {"minilm onnx fp32 (default)"}
    assert "bf16 instructions; torch CPU capability" in performance.render(report)


def peers_report(ratio_to_fastest):
    """A ``bench_peers.py`` report with one labeling part and one failed compile."""

    def variant(name, rate, ratio):
        return {"variant": name, "ran": "fp32", "items_per_s": rate, "pass_items_per_s": rate,
                "wall_s_rounds": [1.0], "agreement_with_zmdevice": 1.0,
                "agreement_with_reference": 1.0, "zmdevice_over_this": ratio,
                "zmdevice_over_this_pass": ratio}  # fmt: skip

    busy = {"cpu0": 0.99, "cpu1": 0.97}
    part = {"command": "python benchmarks/bench_peers.py --quick", "mode": "quick",
            "wall_s": 10.0, "threads": 1, "core_busy_share": busy}  # fmt: skip
    label = {
        "teacher": "minilm", "items": 256, "rounds": 2, "reference": "peer fp32",
        "variants": [variant("zmdevice label (defaults)", 120.0, 1.0),
                     variant("peer fp32", 100.0, ratio_to_fastest)],
        "fastest_peer": "peer fp32", "ratio_to_fastest_peer": ratio_to_fastest,
        "target": 1.2, "agreement_target": 0.995,
    }  # fmt: skip
    failed = {"backend": "inductor", "rows": [{"what": "tiny", "error": "no C compiler"}]}
    return {
        "format": "zmdevice-peers",
        "cpu": {"model": "Test CPU"},
        "threads": 1,
        "affinity": [1],
        "parts": {
            "label-text": {**part, "result": label},
            "compile": {**part, "result": failed},
        },
    }


def test_peers_section_judges_the_fastest_peer(report):
    missed = performance.judged_rows(report, peers_report(1.1))
    met = performance.judged_rows(report, peers_report(1.3))
    assert len(missed) == len(met) == len(performance.judged_rows(report)) + 1
    assert missed[-1].status == "missed" and met[-1].status == "met"  # 1.1 < 1.2 <= 1.3
    text = performance.render(report, peers=peers_report(1.1))
    assert "## Against the peers and the hardware" in text
    assert "[Test CPU, 1 thread on core 1; other cpu0 busy 99%]" in text  # every subject
    assert "failed: no C compiler" in text
    assert "## Against the peers" not in performance.render(report)  # no file, no section


def test_calibration_cost_and_bf16_peaks_are_judged_and_shown(report):
    peers = peers_report(1.3)
    part = peers["parts"]["label-text"]
    measured = {"chosen": "torch-bf16", "candidates": {
        "torch-fp32": {"speedup": 1.0, "agreement": 1.0},
        "torch-bf16": {"speedup": 1.8, "agreement": 0.995},
        "onnx-int8": {"error": "export failed"}}}  # fmt: skip
    calibration = {
        "teacher": "minilm", "items": 10000, "chosen": {"precision": "bf16", "runtime": "torch"},
        "calibration": measured, "cached_record": True, "measuring_wall_s": 40.0,
        "cached_wall_s": 36.3, "baseline_wall_s": 36.0, "measuring_cost_share": 4 / 36,
        "cached_cost_share": 0.3 / 36, "target_share": 0.05,
    }  # fmt: skip
    row = {"what": "distilbert student training step (fwd + bwd + AdamW), bf16", "batch": "48x40",
           "flops": 1e11, "seconds": 1.0, "cpu_seconds": 1.0, "peak": "bf16",
           "achieved_flops": 1e11, "share_of_peak": 0.25, "achieved_flops_per_cpu_s": 1e11,
           "share_of_peak_per_cpu_s": 0.25}  # fmt: skip
    hardware = {"peak_fp32_flops": 2e11, "peak_bf16_flops": 4e11, "peak_assumption": "test",
                "rows": [row]}  # fmt: skip
    peers["parts"].update(calibration={**part, "result": calibration},
                          hardware={**part, "result": hardware})  # fmt: skip
    judged = {r.quantity: r.status for r in performance.judged_rows(report, peers)}
    assert judged["measuring's cost: extra wall time over the flags' run (%)"] == "missed"
    cached = next(q for q in judged if q.startswith("cached rerun's cost"))
    assert judged[cached] == "met" and "not measured: yes" in cached
    text = performance.render(report, peers=peers)
    assert "torch-bf16 1.80x (99.5%); onnx-int8 failed" in text
    assert "100.00 (25.0% of bf16 peak)" in text
