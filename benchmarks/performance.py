"""The performance report: run the three cost benchmarks, store their numbers, render a page.

    python benchmarks/performance.py                # full budgets (about 6 min, idle 2 cores)
    python benchmarks/performance.py --quick        # small budgets: a smoke run of a few minutes
    python benchmarks/performance.py --jobs train   # only some jobs (the others show "not run")
    python benchmarks/performance.py render         # the page again from the stored JSON

Each benchmark runs as its own process (a job), so its peak RSS is its own:
``bench_label.py`` (labeling throughput vs the bare FM forward; pseudo-label file sizes),
``bench_train.py`` (stage-2 step vs the bare student forward+backward; peak RSS; checkpoint
sizes) and ``bench_export.py`` once per student (ONNX vs PyTorch latency; ONNX fp32/int8 and
checkpoint sizes). Every ratio is measured inside one job, both sides under the same
machine load. The numbers, the environment and the exact commands go to
``benchmarks/performance.json``; ``benchmarks/PERFORMANCE.md`` is generated from that file
only, with each target next to its number, met or missed.

The JSON does not live in ``benchmarks/results/``: ``paper.py table`` reads every JSON file
there as a paper run (and ``paper.py run`` ends with ``table``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
REPORT_JSON = BENCH / "performance.json"
PEERS_JSON = BENCH / "peers-performance.json"
"""``bench_peers.py``'s numbers: zmdevice against hand-written peers and the CPU's peak."""
PAGE = BENCH / "PERFORMANCE.md"
WORK = BENCH / "work" / "performance"
JOBS = ("label", "train", "export", "precision")
FORMAT = "zmdevice-performance"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """How much each job measures; ``FULL`` and ``QUICK`` below."""

    texts: int
    """MiniLM labeling: texts timed (``bench_label.py --texts``)."""
    images: int
    """EfficientNet-Lite0 labeling: images timed (``--images``; 0 = no image FM)."""
    label_batch_size: int
    """Labeling batch (``bench_label.py --batch-size``)."""
    train_steps: int
    """Stage-2 steps per student (``bench_train.py --steps``; the mean skips 4 and the last)."""
    train_samples: int
    """Synthetic unlabeled samples of the training job (``bench_train.py --samples``)."""
    image_steps: int
    """Training steps of the exported image student (``bench_export.py --image-steps``)."""
    text_steps: int
    """Training steps of the exported text student (``bench_export.py --text-steps``)."""
    repeats: int
    """Timed batch-1 inferences per runtime (``bench_export.py --repeats``)."""
    precision_texts: int = 1024
    """MiniLM texts of the precision job (``bench_precision.py --count``), per variant."""
    precision_images: int = 256
    """EfficientNet-Lite0 images of the precision job (``--count-images``), per variant."""
    precision_steps: int = 8
    """Timed training steps per precision and student (``bench_precision.py --steps``)."""
    students: tuple[str, ...] = ("mobilenet_v3_small", "distilbert")
    """Students of the training, export and precision jobs."""


FULL = Budget(
    texts=2048,  # start-up costs (workers, final file) amortised as in real use
    images=1000,
    label_batch_size=64,
    train_steps=81,  # 4 warm-up steps, 19 whole 4-step look-ahead cycles, the saving step
    train_samples=5000,
    image_steps=300,
    text_steps=150,
    repeats=100,
)
QUICK = Budget(
    texts=128,
    images=32,
    label_batch_size=32,
    train_steps=13,
    train_samples=400,
    image_steps=20,
    text_steps=10,
    repeats=20,
    precision_texts=128,
    precision_images=32,
    precision_steps=2,
)


# --------------------------------------------------------------------------- running the jobs


def job_commands(budget: Budget, work: Path) -> list[tuple[str, list[str], Path]]:
    """(job name, argv, JSON summary path) of every job, in run order."""
    python = sys.executable
    label_json, train_json = work / "label.json", work / "train.json"
    jobs = [
        (
            "label",
            [python, "benchmarks/bench_label.py", "--texts", str(budget.texts),
             "--images", str(budget.images), "--batch-size", str(budget.label_batch_size),
             "--json", rel(label_json)],
            label_json,
        ),
        (
            "train",
            [python, "benchmarks/bench_train.py", "--steps", str(budget.train_steps),
             "--samples", str(budget.train_samples), "--json", rel(train_json),
             *(arg for s in budget.students for arg in ("--student", s))],
            train_json,
        ),
    ]  # fmt: skip
    precision_json = work / "precision.json"
    jobs.append(
        (
            "precision",
            [python, "benchmarks/bench_precision.py", "--count", str(budget.precision_texts),
             "--count-images", str(budget.precision_images),
             "--batch-size", str(budget.label_batch_size),
             "--image-variants", "torch:fp32", "onnx:fp32",
             "--steps", str(budget.precision_steps), "--students", *budget.students,
             "--json", rel(precision_json)],
            precision_json,
        )
    )  # fmt: skip
    for student in budget.students:
        out = work / f"export-{student}.json"
        jobs.append(
            (
                f"export-{student}",
                [python, "benchmarks/bench_export.py", "--students", student,
                 "--image-steps", str(budget.image_steps), "--text-steps", str(budget.text_steps),
                 "--repeats", str(budget.repeats), "--work", rel(work / "export"),
                 "--json", rel(out)],
                out,
            )
        )  # fmt: skip
    return jobs


def rel(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it (shorter commands)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_job(name: str, argv: list[str], summary: Path) -> dict:
    """Run one benchmark process from the repository root, echoing its stdout.

    Returns:
        name, argv, returncode, wall_s, cpu_s (user+sys of the job and the processes it
        waited for), tree_peak_rss_gb (the largest RSS of any one of those processes, not
        their sum), result (the parsed JSON summary, None if missing) and, on failure,
        error (the end of its stderr).
    """
    summary.unlink(missing_ok=True)  # never report a previous run's numbers as this one's
    # This checkout's zmdevice, whatever an installed (maybe editable elsewhere) one says.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # every model is local
    print(f"[performance] {name}: {shlex.join(display_argv(argv))}", flush=True)
    started = time.perf_counter()
    # stderr to a file, not a pipe: a full pipe nobody reads would stall the child.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        for line in process.stdout:
            print("    " + line, end="", flush=True)
        # wait4, not wait: it also returns the job's resource usage, peak RSS included.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    job = {
        "name": name,
        "argv": display_argv(argv),
        "returncode": process.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "tree_peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),  # KiB on Linux
        "result": json.loads(summary.read_text()) if summary.is_file() else None,
    }
    if process.returncode != 0 or job["result"] is None:
        job["error"] = stderr[-3000:] or "no JSON summary written"
        print(f"[performance] {name} FAILED (exit {process.returncode}):\n{job['error']}")
    return job


def display_argv(argv: list[str]) -> list[str]:
    return ["python" if arg == sys.executable else arg for arg in argv]


def package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    import importlib.metadata as metadata

    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def machine() -> tuple[str, float | None]:
    """(CPU model name, memory in GB) from /proc where it exists."""
    cpu, memory_gb = platform.processor() or platform.machine(), None
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        kib = next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory_gb = round(int(kib) / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    return cpu, memory_gb


def environment() -> dict:
    """The machine and software the numbers come from (no heavy imports)."""
    versions = package_versions(
        ("zmdevice", "torch", "torchvision", "transformers", "onnx", "onnxruntime")
    )
    cpu, memory_gb = machine()
    threads_env = {
        key: os.environ[key] for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ
    }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "interpreter": sys.executable,
        **versions,
        "thread_env": threads_env,
        "git_commit": git("rev-parse", "HEAD"),
        # Uncommitted edits change what was measured: name them.
        "git_modified_files": [
            line[3:] for line in (git("status", "--porcelain", "-uno") or "").splitlines()
        ],
    }


def git(*args: str) -> str | None:
    """A read-only git query; ``--no-optional-locks`` so it never rewrites the index."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    # rstrip only: porcelain lines start with a meaningful space (" M path")
    return done.stdout.rstrip() if done.returncode == 0 else None


def run_report(budget: Budget, mode: str, jobs: tuple[str, ...], work: Path, command: str):
    """Run the chosen jobs one after the other; return the report dict."""
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "budget": asdict(budget),
        "command": command,
        "started": utc_now(),
        "environment": environment(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "jobs": [],
    }
    for name, argv, summary in job_commands(budget, work):
        if name.split("-")[0] in jobs:
            report["jobs"].append(run_job(name, argv, summary))
    report["finished"] = utc_now()
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- the page


@dataclass
class Row:
    """One number on the page, with its target where one is set."""

    subject: str
    quantity: str
    value: float | None
    shown: str
    target: tuple[str, float] | None = None
    """(comparison, threshold): ``>=``, ``<=``, ``<`` or ``within`` (absolute value <=)."""
    unit: str = ""
    """Unit of the threshold, for the target column."""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        return judge(self.value, *self.target)

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        comparison, threshold = self.target
        symbol = {">=": "≥", "<=": "≤", "<": "<", "within": "within ±"}[comparison]
        space = "" if comparison == "within" else " "
        return f"{symbol}{space}{threshold:g}{self.unit}"


def judge(value: float | None, comparison: str, threshold: float) -> str:
    """``met``, ``missed`` or ``not measured`` (no value)."""
    if value is None:
        return "not measured"
    ok = {
        ">=": value >= threshold,
        "<=": value <= threshold,
        "<": value < threshold,
        "within": abs(value) <= threshold,
    }[comparison]
    return "met" if ok else "missed"


def mb(count: int | None) -> str:
    """Bytes for a reader: MB (or kB below 1 MB) and the exact count."""
    if count is None:
        return "-"
    shown = f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"
    return f"{shown} ({count:,} B)"


def job_results(report: dict, prefix: str) -> tuple[list, list[dict]]:
    """(results of the jobs named ``prefix`` or ``prefix-*``, those jobs)."""
    jobs = [j for j in report["jobs"] if j["name"].split("-")[0] == prefix]
    results = []
    for job in jobs:
        if job.get("result") is None:
            continue
        results += job["result"] if isinstance(job["result"], list) else [job["result"]]
    return results, jobs


def label_rows(report: dict) -> tuple[list[Row], list[Row]]:
    """(throughput rows, pseudo-label file rows) from the label job."""
    results, _ = job_results(report, "label")
    throughput, files = [], []
    for result in results:
        for t in result["throughput"]:
            subject = f"{t['teacher']} ({t['items']} items, batch {result['batch_size']})"
            throughput += [
                Row(subject, "end-to-end `run_label` (items/s)", t["end_to_end_per_s"],
                    f"{t['end_to_end_per_s']:.1f}"),
                Row(subject, "bare FM forward (items/s)", t["bare_forward_per_s"],
                    f"{t['bare_forward_per_s']:.1f}"),
                Row(subject, "ratio end-to-end / bare", t["ratio"], f"{t['ratio']:.2f}",
                    (">=", t["ratio_target"])),
            ]  # fmt: skip
            if "label_agreement" in t:  # reports from before the agreement was measured
                throughput.append(
                    Row(subject, f"labels equal to the bare pass's (%; teacher ran {t['precision']}"
                        f", {t['runtime']})", 100 * t["label_agreement"],
                        f"{100 * t['label_agreement']:.2f}",
                        (">=", 100 * t["agreement_target"]), "%")
                )  # fmt: skip
            files += [
                Row(f"{t['teacher']}: file `run_label` wrote", "size", t["file_bytes"],
                    f"{mb(t['file_bytes'])}, {t['items']} samples, {t['classes']} classes"),
                Row(f"{t['teacher']}: file `run_label` wrote", "bytes per sample",
                    t["bytes_per_sample"],
                    f"{t['bytes_per_sample']:.1f} (float32 probabilities alone: "
                    f"{t['float32_bytes_per_sample']})"),
            ]  # fmt: skip
        for s in result["sizes"]:
            subject = f"{s['name']} (C={s['classes']}, N={s['samples']})"
            ratio_target = None if s["ratio_target"] is None else ("<=", s["ratio_target"])
            files += [
                Row(subject, "file / float32 .npy", s["ratio"], f"{s['ratio']:.3f}x",
                    ratio_target, "x"),
                Row(subject, "bytes per sample", s["file_bytes"] / s["samples"],
                    f"{s['file_bytes'] / s['samples']:.1f}"),
                Row(subject, "mean KL(full ‖ stored) (nats)", s["mean_kl"],
                    f"{s['mean_kl']:.2e}", ("<=", s["kl_target"])),
            ]  # fmt: skip
    return throughput, files


def train_rows(report: dict) -> list[Row]:
    results, _ = job_results(report, "train")
    rows = []
    for r in results:
        if "error" in r:  # its targets show as not measured
            rows += [
                Row(r["student"], "ratio step / bare", None, "run failed",
                    ("<=", r["ratio_target"])),
                Row(r["student"], "training process peak RSS (GB)", None, "run failed",
                    None if r["rss_target_gb"] is None else ("<=", r["rss_target_gb"]), " GB"),
            ]  # fmt: skip
            continue
        subject = r["student"]
        rows += [
            Row(subject, "stage-2 batch, torch threads, precision", None,
                f"{r['batch']}; {r['threads']}; {r.get('precision', 'fp32')}"),
            Row(subject, "stage-2 step (ms, mean)", r["step_s"], f"{1000 * r['step_s']:.0f}"),
            Row(subject, "bare student forward+backward (ms, mean)",
                r["bare_forward_backward_s"], f"{1000 * r['bare_forward_backward_s']:.0f}"),
            Row(subject, "ratio step / bare", r["ratio"], f"{r['ratio']:.2f}",
                ("<=", r["ratio_target"])),
        ]  # fmt: skip
    return rows


def export_rows(report: dict) -> list[Row]:
    results, _ = job_results(report, "export")
    rows = []
    for r in results:
        targets = r.get("targets", {})
        subject = r["student"]
        rows += [
            Row(subject, "batch, threads (both runtimes)", None, f"1, {r['threads']}"),
            Row(subject, "PyTorch eager (ms, median)", r["torch_ms"], f"{r['torch_ms']:.2f}"),
            Row(subject, "onnxruntime fp32 (ms, median)", r["onnx_fp32_ms"],
                f"{r['onnx_fp32_ms']:.2f}"),
            Row(subject, "onnxruntime int8 (ms, median)", r["onnx_int8_ms"],
                f"{r['onnx_int8_ms']:.2f}"),
            Row(subject, "ratio onnxruntime fp32 / PyTorch", r["fp32_over_torch"],
                f"{r['fp32_over_torch']:.2f}x", tuple_or_none(targets, "fp32_over_torch"), "x"),
            Row(subject, "test accuracy fp32 / int8 (%)", None,
                f"{100 * r['fp32_accuracy']:.2f} / {100 * r['int8_accuracy']:.2f}"),
            Row(subject, "int8 - fp32 accuracy (points)", r["int8_minus_fp32_points"],
                f"{r['int8_minus_fp32_points']:+.2f}",
                tuple_or_none(targets, "int8_minus_fp32_points"), " point"),
            Row(subject, "`zmdevice predict` cold start beyond the interpreter (s)",
                r["beyond_interpreter_s"],
                f"{r['beyond_interpreter_s']:.2f} (total {r['predict_s']:.2f})",
                tuple_or_none(targets, "beyond_interpreter_s"), " s"),
        ]  # fmt: skip
    return rows


STEP_SPEEDUP_TARGET = {"distilbert": 1.6}
"""Default-precision training step speed over fp32 eager, at least, per student."""


def precision_rows(report: dict) -> list[Row]:
    """Each teacher variant's speed and agreement, each student precision's step time; the
    default (``auto`` on this machine) against the fp32 eager baseline, judged."""
    results, _ = job_results(report, "precision")
    rows = []
    for result in results:
        flags = ", ".join(result["cpu_bf16_flags"]) or "none"
        rows.append(
            Row("this CPU", "bf16 instructions; torch CPU capability", None,
                f"{flags}; {result['cpu_capability']}")
        )  # fmt: skip
        for t in result["teachers"]:
            subject = f"{t['teacher']} {t['variant']}" + (" (default)" if t["default"] else "")
            agreement_target = result["agreement_target"] if t["default"] else None
            rows += [
                Row(subject, f"items/s ({t['items']} items, batch {t['batch_size']})",
                    t["items_per_s"], f"{t['items_per_s']:.1f}"),
                Row(subject, "ratio to fp32 eager", t["ratio_to_fp32_eager"],
                    f"{t['ratio_to_fp32_eager']:.2f}x"),
                Row(subject, "labels agreeing with fp32 eager (%)", 100 * t["label_agreement"],
                    f"{100 * t['label_agreement']:.2f}",
                    None if agreement_target is None else (">=", 100 * agreement_target), "%"),
                Row(subject, "max probability difference; same float16 (%)", None,
                    f"{t['max_abs_prob_diff']:.1e}; {100 * t['same_fp16_share']:.1f}"),
            ]  # fmt: skip
        for r in result["students"]:
            subject = f"{r['student']} {r['precision']}" + (" (default)" if r["default"] else "")
            target = STEP_SPEEDUP_TARGET.get(r["student"]) if r["default"] else None
            rows += [
                Row(subject, f"bare training step (ms, median; batch {r['batch']})", r["step_s"],
                    f"{1000 * r['step_s']:.0f}"),
                Row(subject, "speed-up over fp32 eager", r["speedup_vs_fp32"],
                    f"{r['speedup_vs_fp32']:.2f}x", None if target is None else (">=", target),
                    "x"),
            ]  # fmt: skip
    return rows


def tuple_or_none(targets: dict, key: str) -> tuple[str, float] | None:
    return tuple(targets[key]) if key in targets else None


def size_rows(report: dict) -> list[Row]:
    """Every artifact a user ships or keeps: label file, checkpoints, ONNX fp32 and int8."""
    labels, _ = job_results(report, "label")
    trains, _ = job_results(report, "train")
    exports, _ = job_results(report, "export")
    rows = []
    for result in labels:
        for t in result["throughput"]:
            rows.append(
                Row(t["teacher"], "pseudo-label file (`labels/NAME.parquet`)", t["file_bytes"],
                    f"{mb(t['file_bytes'])}; {t['bytes_per_sample']:.1f} B/sample "
                    f"at {t['items']} samples")
            )  # fmt: skip
    for r in exports:
        rows += [
            Row(r["student"], "checkpoint `models/NAME/student.safetensors`",
                r["checkpoint_bytes"], mb(r["checkpoint_bytes"])),
            Row(r["student"], "whole `models/NAME/` folder", r["model_dir_bytes"],
                mb(r["model_dir_bytes"])),
            Row(r["student"], "ONNX fp32", r["fp32_bytes"], mb(r["fp32_bytes"])),
            Row(r["student"], "ONNX int8", r["int8_bytes"], mb(r["int8_bytes"])),
            Row(r["student"], "ratio int8 / fp32", r["int8_over_fp32_size"],
                f"{r['int8_over_fp32_size']:.3f}x",
                tuple_or_none(r.get("targets", {}), "int8_over_fp32_size"), "x"),
        ]  # fmt: skip
        if r.get("tokenizer_bytes"):
            rows.append(
                Row(r["student"], "tokenizer next to the ONNX file", r["tokenizer_bytes"],
                    mb(r["tokenizer_bytes"]))
            )  # fmt: skip
    for r in trains:
        if "resume_checkpoint_bytes" in r:
            rows.append(
                Row(r["student"], "resume checkpoint `checkpoints/last.pt` (stage 2)",
                    r["resume_checkpoint_bytes"], mb(r["resume_checkpoint_bytes"]))
            )  # fmt: skip
    return rows


def memory_rows(report: dict) -> list[Row]:
    rows = []
    trains, _ = job_results(report, "train")
    for r in trains:
        if "peak_rss_gb" in r:
            target = None if r["rss_target_gb"] is None else ("<=", r["rss_target_gb"])
            rows.append(
                Row(r["student"], "training process peak RSS (GB)", r["peak_rss_gb"],
                    f"{r['peak_rss_gb']:.2f}", target, " GB")
            )  # fmt: skip
    labels, _ = job_results(report, "label")
    for result in labels:
        teachers = ", ".join(t["teacher"] for t in result["throughput"])
        rows += [
            Row(teachers, "labeling process peak RSS (GB; holds each teacher twice)",
                result["peak_rss_gb"], f"{result['peak_rss_gb']:.2f}"),
            Row(teachers, "largest data-loader worker peak RSS (GB)",
                result["loader_workers_peak_rss_gb"],
                f"{result['loader_workers_peak_rss_gb']:.2f}"),
        ]  # fmt: skip
    exports, _ = job_results(report, "export")
    for r in exports:
        rows.append(
            Row(r["student"], "export job peak RSS (GB; train + export + latency)",
                r["process_peak_rss_gb"], f"{r['process_peak_rss_gb']:.2f}")
        )  # fmt: skip
    return rows


PEERS_HEADING = "Against the peers and the hardware"
PEERS_HOW = (
    "`benchmarks/bench_peers.py` (its own JSON, `benchmarks/peers-performance.json`, "
    "run part by part, each part one process): zmdevice against what a user would write "
    "instead, the two alternating round by round in one process (order rotated; the best "
    "round of each counts), and achieved FLOP/s against the core's peak. Labeling: "
    "`run_label` (what `zmdevice label` runs) at its defaults, timed from the call to the "
    "written file, against the peer timed from loading its model to its labels, both with "
    'warm caches (one untimed run of each first); "pass only" leaves model loading out. '
    "Agreement: the same label as zmdevice's file. Training: one run each, wall time from "
    "loading the model to the trained classifier. FLOPs: `FlopCounterMode` on one batch "
    "(matrix products and convolutions; the convolution backward counted by the script, as "
    "torch's formula counts a depthwise layer's weight gradient once per channel), over the "
    "median wall time and over the process's CPU time of the same calls (on a shared core "
    "the second shows the code's own rate). `torch.compile`: inductor at its defaults, "
    "compile time = first call minus a steady call, eager and compiled alternating, outputs "
    "compared at the same weights and inputs before any step (`fallback_random`, so that "
    "dropout draws the same numbers). Every subject names the CPU, the torch threads "
    "and how busy the other core was during that part: these runs shared the machine, so "
    "absolute rates are low and noisy and only the side-by-side ratios compare."
)


def peer_tag(peers: dict, part: dict) -> str:
    """'[CPU, N thread(s), core K busy P%]' for the subject of every row of a part."""
    mine = {f"cpu{i}" for i in peers.get("affinity", [])}
    others = [f"{name} busy {100 * share:.0f}%"
              for name, share in sorted(part.get("core_busy_share", {}).items())
              if name not in mine]  # fmt: skip
    threads = part.get("threads", peers.get("threads"))
    pinned = ", ".join(f"core {i}" for i in peers.get("affinity", []))
    other = ("; other " + ", ".join(others)) if others else ""
    plural = "s" if threads != 1 else ""
    share = part.get("own_cpu_share")
    own = "" if share is None else f"; this process got {100 * share:.0f}% of its core"
    return f"[{peers['cpu']['model']}, {threads} thread{plural} on {pinned}{own}{other}]"


def candidate_cell(name: str, result: dict) -> str:
    """One teacher candidate of a calibration record, as the page shows it."""
    if "speedup" in result:
        return f"{name} {result['speedup']:.2f}x ({100 * result['agreement']:.1f}%)"
    if "skipped" in result:
        return f"{name} not measured (its export: over the allowance)"
    return f"{name} failed"


def peer_rows(peers: dict) -> list[Row]:
    """The rows of ``bench_peers.py``'s report (``PEERS_JSON``)."""
    parts, rows = peers.get("parts", {}), []
    for key in ("label-text", "label-image"):
        if key not in parts:
            continue
        result, tag = parts[key]["result"], peer_tag(peers, parts[key])
        subject = f"{result['teacher']} labeling, {result['items']} items {tag}"
        for v in result["variants"]:
            rows.append(
                Row(subject, f"{v['variant']} ({v['ran']}): items/s end to end; pass only",
                    v["items_per_s"], f"{v['items_per_s']:.1f}; {v['pass_items_per_s']:.1f}")
            )  # fmt: skip
        for v in result["variants"][1:]:
            rows += [
                Row(subject, f"zmdevice / {v['variant']}: end to end; pass only",
                    v["zmdevice_over_this"],
                    f"{v['zmdevice_over_this']:.2f}x; {v['zmdevice_over_this_pass']:.2f}x"),
                Row(subject, f"{v['variant']}: labels equal to zmdevice's (%)",
                    100 * v["agreement_with_zmdevice"],
                    f"{100 * v['agreement_with_zmdevice']:.2f}"),
            ]  # fmt: skip
        rows.append(
            Row(subject, f"zmdevice / fastest peer ({result['fastest_peer']}), end to end",
                result["ratio_to_fastest_peer"], f"{result['ratio_to_fastest_peer']:.2f}x",
                (">=", result["target"]), "x")
        )  # fmt: skip
    if "calibration" in parts:
        r, tag = parts["calibration"]["result"], peer_tag(peers, parts["calibration"])
        subject = f"{r['teacher']} labeling, {r['items']} texts, `auto` measuring {tag}"
        chosen = f"{r['chosen']['precision']}, {r['chosen']['runtime']}"
        record = r["calibration"] or {}
        rows += [
            Row(subject, f"wall (s): measuring (empty cache); cached rerun; the chosen numerics "
                f"({chosen}) as flags", r["measuring_wall_s"],
                f"{r['measuring_wall_s']:.1f}; {r['cached_wall_s']:.1f}; "
                f"{r['baseline_wall_s']:.1f}"),
            Row(subject, "candidates measured: speed vs torch fp32 (labels equal)", None,
                "; ".join(candidate_cell(name, c)
                          for name, c in record.get("candidates", {}).items()) or "none"),
            Row(subject, "measuring's cost: extra wall time over the flags' run (%)",
                100 * r["measuring_cost_share"], f"{100 * r['measuring_cost_share']:+.1f}",
                ("<=", 100 * r["target_share"]), "%"),
            *([Row(subject, "measuring's own seconds as each first run reports them "
                   f"({', '.join(f'{x:.2f}' for x in r['measuring_seconds_each_round'])} s), "
                   "least, % of the flags' run", 100 * r["measuring_seconds_share"],
                   f"{100 * r['measuring_seconds_share']:.1f}")]
              if "measuring_seconds_share" in r else []),
            Row(subject, "cached rerun's cost over the flags' run (%; the decision read, "
                f"not measured: {'yes' if r['cached_record'] else 'no'})",
                100 * r["cached_cost_share"], f"{100 * r['cached_cost_share']:+.1f}",
                ("<=", 2.0), "%"),  # wall-time noise: the flag says no candidate ran
        ]  # fmt: skip
    if "train" in parts:
        r, tag = parts["train"]["result"], peer_tag(peers, parts["train"])
        subject = f"text training, examples/default/text {tag}"
        for name, side in (("zmdevice.train", r["zmdevice"]), ("SetFit", r["setfit"])):
            rows.append(
                Row(subject, f"{name}: wall (s); steps; texts through the network; test "
                    "accuracy", side["wall_s"],
                    f"{side['wall_s']:.1f}; {side['steps']}; {side['texts_through_network']}; "
                    f"{100 * side['test_accuracy']:.1f}%")
            )  # fmt: skip
        rows.append(
            Row(subject, "zmdevice / SetFit: speed (SetFit wall / zmdevice wall); texts/s",
                r["wall_ratio_setfit_over_zmdevice"],
                f"{r['wall_ratio_setfit_over_zmdevice']:.2f}x; {r['texts_per_s_ratio']:.2f}x")
        )  # fmt: skip
    if "inference" in parts:
        r, tag = parts["inference"]["result"], peer_tag(peers, parts["inference"])
        subject = f"exported distilbert student, {r['items']} texts, batch {r['batch']} {tag}"
        rows += [
            Row(subject, "zmdevice.load(...).predict: items/s", r["zmdevice_items_per_s"],
                f"{r['zmdevice_items_per_s']:.1f}"),
            Row(subject, "onnxruntime.InferenceSession + tokenizers: items/s",
                r["onnxruntime_items_per_s"], f"{r['onnxruntime_items_per_s']:.1f}"),
            Row(subject, "ratio zmdevice / onnxruntime", r["ratio"], f"{r['ratio']:.2f}x"),
            Row(subject, "labels equal (%)", 100 * r["agreement"], f"{100 * r['agreement']:.2f}"),
        ]  # fmt: skip
        if "tuned_items_per_s" in r:
            rows += [
                Row(subject, f"the same session with intra_op_num_threads={r['tuned_threads']}: "
                    "items/s; zmdevice / it", r["tuned_items_per_s"],
                    f"{r['tuned_items_per_s']:.1f}; {r['ratio_to_tuned']:.2f}x"),
            ]  # fmt: skip
        rows.append(Row(subject, "optimum", None, r["optimum"]))
    if "hardware" in parts:
        r, tag = parts["hardware"]["result"], peer_tag(peers, parts["hardware"])
        peak = r["peak_fp32_flops"]
        bf16 = r["peak_bf16_flops"]
        rows += [
            Row(f"this core {tag}", "fp32 peak (GFLOP/s): how it is counted", peak / 1e9,
                f"{peak / 1e9:.1f}: {r['peak_assumption']}"),
            Row(f"this core {tag}", "bf16 peak (GFLOP/s)", bf16,
                "none: no avx512_bf16 or amx_bf16" if bf16 is None else f"{bf16 / 1e9:.1f}"),
        ]  # fmt: skip
        for h in r["rows"]:
            # Rows stored before bf16 rows were measured hold their fp32 share only.
            dtype = h.get("peak", "fp32")
            share = h.get("share_of_peak", h.get("share_of_fp32_peak"))
            rows.append(
                Row(f"{h['what']} {tag}", f"achieved GFLOP/s (batch {h['batch']}; "
                    f"{h['flops'] / 1e9:.2f} GFLOP in {1000 * h['seconds']:.0f} ms, median)",
                    h["achieved_flops"],
                    f"{h['achieved_flops'] / 1e9:.2f} ({100 * share:.1f}% of {dtype} peak)")
            )  # fmt: skip
            if "cpu_seconds" in h:
                per_cpu = h.get("share_of_peak_per_cpu_s", h.get("share_of_fp32_peak_per_cpu_s"))
                rows.append(
                    Row(f"{h['what']} {tag}", "GFLOP per CPU second of the process (the same "
                        f"calls; {1000 * h['cpu_seconds']:.0f} ms CPU, median)",
                        h["achieved_flops_per_cpu_s"],
                        f"{h['achieved_flops_per_cpu_s'] / 1e9:.2f} "
                        f"({100 * per_cpu:.1f}% of {dtype} peak)")
                )  # fmt: skip
    if "compile" in parts:
        r, tag = parts["compile"]["result"], peer_tag(peers, parts["compile"])
        for c in r["rows"]:
            # Rows measured by a later run for one model carry their own machine load.
            own = {k: c[k] for k in ("own_cpu_share", "core_busy_share") if k in c}
            row_tag = peer_tag(peers, {**parts["compile"], **own}) if own else tag
            subject = f"torch.compile, {c['what']} {row_tag}"
            if "error" in c:
                rows.append(Row(subject, "inductor", None, "failed: " + c["error"][:300]))
                continue
            grad = c.get("max_abs_grad_diff")
            rows += [
                Row(subject, "compile time (s): first call minus a steady call",
                    c["compile_s"], f"{c['compile_s']:.1f} (first call {c['first_call_s']:.1f})"),
                Row(subject, "s per call, eager / compiled (median)", None,
                    f"{c['eager_s']:.3f} / {c['compiled_s']:.3f}"),
                Row(subject, "speed-up of compiled over eager", c["speedup"],
                    f"{c['speedup']:.2f}x"),
                Row(subject, "max abs difference: outputs (max abs output); gradients",
                    c["max_abs_output_diff"],
                    f"{c['max_abs_output_diff']:.1e} ({c['max_abs_output']:.1f}); "
                    + ("-" if grad is None else f"{grad:.1e}")),
            ]  # fmt: skip
    for key, part in parts.items():
        busy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(part["core_busy_share"].items()))
        rows.append(
            Row(f"part {key}", "command; mode; wall (s); cores busy during it", part["wall_s"],
                f"`{part['command'].strip()}`; {part['mode']}; {part['wall_s']}; {busy}")
        )  # fmt: skip
    return rows


def sections(report: dict, peers: dict | None = None) -> list[tuple[str, str, list[Row]]]:
    """(heading, how it was measured, rows) of every table on the page; ``peers``
    (``bench_peers.py``'s report) adds the last one."""
    throughput, files = label_rows(report)
    peer_section = [(PEERS_HEADING, PEERS_HOW, peer_rows(peers))] if peers else []
    return [
        ("Labeling throughput", "`run_label` end to end at its defaults (loader workers, "
         "the teacher at its `auto` precision and runtime, texts shortest first, "
         "compression, part files, final file) against the teacher's bare batched forward "
         "in PyTorch fp32 eager on the same inputs, already collated in data order, in the "
         "same process (what labeling cost before any fast path); the bare pass runs before "
         "and after, the faster one counts. Agreement: the file's labels against the bare "
         "pass's.", throughput),
        ("Training step", "Mean stage-2 step of `run_train` (zeromatch, default batch "
         "sizes, synthetic data; data pipeline + augmentation + forward + losses + backward "
         "+ optimizer step) against the mean bare forward+backward of the same student "
         "preset on a ready batch of the same composition, at the precision the run chose, "
         "timed right after each step in the same process. Means, not medians: image views "
         "are built 4 steps at a time.",
         train_rows(report)),
        ("ONNX vs PyTorch latency", "One process per student: a student trained briefly on "
         "the embedded default data, exported with `--quantize int8 --test`; median batch-1 "
         "latency of PyTorch eager and onnxruntime with the same threads and input.",
         export_rows(report)),
        ("Precision and runtime", "`bench_precision.py`: the teachers' batched forward in "
         "PyTorch fp32 eager (the baseline), bf16 autocast and onnxruntime (the teacher's "
         "cached ONNX export, fp32 and dynamic int8) on batches in data order, and one bare "
         "training step (forward + backward + AdamW) per "
         "precision, the variants alternating batch by batch in one process; medians. "
         "Agreement: the same argmax label as fp32 eager. `(default)` marks what `--precision "
         "auto --runtime auto` picks on this machine (`zmdevice/precision.py`).",
         precision_rows(report)),
        ("Sizes", "Files as written by the jobs above.", size_rows(report)),
        ("Pseudo-label file size vs float32", "The same probabilities written as a "
         "pseudo-label file (ids and metadata included) and as a float32 `.npy` (no ids).",
         files),
        ("Peak memory", "`ru_maxrss` of each benchmark process (the training job runs one "
         "process per student).", memory_rows(report)),
        *peer_section,
    ]  # fmt: skip


def judged_rows(report: dict, peers: dict | None = None) -> list[Row]:
    """Every row of the page that has a target."""
    tables = sections(report, peers)
    return [row for _, _, rows in tables for row in rows if row.target is not None]


def tally(judged: list[Row]) -> str:
    """'N met, M missed' (+ ', K not measured' when some are)."""
    counts = {s: sum(r.status == s for r in judged) for s in ("met", "missed", "not measured")}
    text = f"{counts['met']} met, {counts['missed']} missed"
    return text + (f", {counts['not measured']} not measured" if counts["not measured"] else "")


def render(report: dict, source: str = rel(REPORT_JSON), peers: dict | None = None) -> str:
    """The Markdown page of a report dict (as ``run_report`` returns and ``source`` stores),
    with ``bench_peers.py``'s report ``peers`` as its last section when given."""
    tables = sections(report, peers)
    judged = judged_rows(report, peers)
    missed = [row for row in judged if row.status == "missed"]
    unmeasured = [row for row in judged if row.status == "not measured"]
    failed = [job for job in report["jobs"] if job.get("error")]
    not_run = [
        name
        for name in JOBS
        if not any(job["name"].split("-")[0] == name for job in report["jobs"])
    ]
    env = report["environment"]
    lines = [
        "# Performance report: labeling, training, export (CPU)",
        "",
        f"Generated by `python benchmarks/performance.py render` from `{source}` (written by "
        f"`{report['command']}`); do not edit by hand.",
        "",
    ]
    if report["mode"] == "quick":
        lines += [
            "> **Quick mode**: reduced budgets, a smoke run. The numbers are noisy and the",
            "> file sizes per sample carry the fixed metadata over few samples; run",
            "> `python benchmarks/performance.py` for the report's numbers.",
            "",
        ]
    lines += [
        f"**Targets: {tally(judged)}** ({report['mode']} run, {report['started']} to "
        f"{report['finished']}).",
        "",
    ]
    lines += [f"- missed: {r.subject}, {r.quantity}: {r.shown} (target {r.target_text})"
              for r in missed]  # fmt: skip
    lines += [f"- not measured: {r.subject}, {r.quantity} (target {r.target_text})"
              for r in unmeasured]  # fmt: skip
    lines += [f"- job `{job['name']}` failed (exit {job['returncode']}): its numbers are "
              f"missing" for job in failed]  # fmt: skip
    lines += [f"- job `{name}` not run in this report" for name in not_run]
    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    threads = {
        job["name"]: job["result"]["threads"]
        for job in report["jobs"]
        if isinstance(job.get("result"), dict) and "threads" in job["result"]
    }
    for job in report["jobs"]:
        if isinstance(job.get("result"), list) and job["result"]:
            threads[job["name"]] = job["result"][0].get("threads")
    cores = env["cores"]
    if env.get("usable_cores") not in (None, cores):
        cores = f"{cores} ({env['usable_cores']} usable)"
    facts = [
        ("CPU", env["cpu"]),
        ("cores", cores),
        ("memory", f"{env['memory_gb']} GB" if env.get("memory_gb") else "-"),
        ("torch threads per job", ", ".join(f"{k}: {v}" for k, v in threads.items()) or "-"),
        ("thread variables", ", ".join(f"{k}={v}" for k, v in env["thread_env"].items()) or "-"),
        ("load average (1/5/15 min), start / end",
         f"{report['load_average_start']} / {report.get('load_average_end')}"),
        ("date (UTC)", f"{report['started']} to {report['finished']}"),
        ("OS, Python", f"{env['os']}, Python {env['python']} (`{env['interpreter']}`)"),
        ("versions", ", ".join(f"{p} {env.get(p)}" for p in
                               ("zmdevice", "torch", "torchvision", "transformers", "onnx",
                                "onnxruntime"))),
        ("git commit", f"`{env['git_commit']}`"),
        ("uncommitted changes to tracked files",
         ", ".join(f"`{f}`" for f in env["git_modified_files"]) or "none"),
    ]  # fmt: skip
    lines += [f"| {key} | {value} |" for key, value in facts]
    for heading, how, rows in tables:
        lines += ["", f"## {heading}", "", how, ""]
        if not rows:
            lines += ["No numbers: the job was not run or failed (see Commands).", ""]
            continue
        lines += ["| subject | quantity | value | target | status |", "|---|---|---|---|---|"]
        for row in rows:
            status = f"**{row.status}**" if row.status == "missed" else row.status
            lines.append(
                f"| {row.subject} | {row.quantity} | {row.shown} | {row.target_text} | {status} |"
            )
    lines += [
        "",
        "## Commands",
        "",
        f"From the repository root: `{report['command']}` ran, one after the other:",
        "",
        "| job | command | exit | wall (s) | CPU (s) | peak RSS of any process (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for job in report["jobs"]:
        lines.append(
            f"| {job['name']} | `{shlex.join(job['argv'])}` | {job['returncode']} | "
            f"{job['wall_s']} | {job['cpu_s']} | {job['tree_peak_rss_gb']:.2f} |"
        )
    lines += [
        "",
        f"Re-render without rerunning: `python benchmarks/performance.py render --json {source}`.",
        "",
    ]
    return "\n".join(lines)


def write_page(report: dict, source: Path, page: Path, peers_json: Path | None = None) -> None:
    """Write the page; ``peers_json``, where it exists, adds the peers section."""
    peers = None
    if peers_json is not None and peers_json.is_file():
        peers = json.loads(peers_json.read_text())
    page.write_text(render(report, rel(source), peers), encoding="utf-8")
    print(f"[performance] targets: {tally(judged_rows(report, peers))}")
    print(f"[performance] wrote {page}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "render"), default="run")
    parser.add_argument("--quick", action="store_true", help="small budgets (a few minutes)")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma list of " + ",".join(JOBS))
    parser.add_argument("--json", type=Path, default=REPORT_JSON, help="the stored numbers")
    parser.add_argument("--page", type=Path, default=PAGE, help="the Markdown page")
    parser.add_argument("--work", type=Path, default=WORK, help="scratch folder of the jobs")
    parser.add_argument(
        "--peers", type=Path,
        help="bench_peers.py's numbers, rendered as the last section where the file exists "
        f"(default: {PEERS_JSON.name} beside --json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.peers = args.peers or args.json.with_name(PEERS_JSON.name)
    if args.command == "render":
        if not args.json.is_file():
            print(f"error: {args.json} not found; run `python benchmarks/performance.py` first")
            return 2
        write_page(json.loads(args.json.read_text()), args.json, args.page, args.peers)
        return 0
    jobs = tuple(name.strip() for name in args.jobs.split(","))
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        print(f"error: --jobs: unknown {', '.join(unknown)}; choose from {', '.join(JOBS)}")
        return 2
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/performance.py", *given])
    mode = "quick" if args.quick else "full"
    report = run_report(QUICK if args.quick else FULL, mode, jobs, args.work, command)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[performance] wrote {args.json}")
    write_page(report, args.json, args.page, args.peers)
    return 1 if any(job.get("error") for job in report["jobs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
