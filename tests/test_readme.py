"""The README's commands and its Python example run as written, and its numbers are the code's.

The ``bash`` block of "The workflow" runs from an empty folder, as from a wheel (the
embedded default data is found through ``zmdevice.catalog``, never through a checkout's
paths), with the real offline FMs. Only the budget shrinks: every ``zmdevice train`` gets
``--kd-steps 2 --ssl-steps 2`` and the DistilBERT student becomes ``tiny-distilbert``. The
``python`` block of "Python API" runs exactly as written, from an empty folder.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zmdevice.pseudolabels import read_pseudolabels

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


LOOP = "Which samples to label next, which labels look wrong"
"""The README section of the labeling loop (suggest, check), run after the workflow."""
TOOLS = "With the tools you already use"
"""The README section of the ecosystem's meeting points, run after the loop."""


def section(title: str, text: str = README) -> str:
    """The text from the ``## title`` heading to the next ``## `` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def tiny_budget(block: str) -> str:
    """The block with continuation lines joined and every training run made tiny."""
    lines = block.replace("\\\n", " ").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("zmdevice train"):
            line = re.sub(r"--(kd|ssl)-steps \d+", "", line)
            line = line.replace("--student distilbert", "--student tiny-distilbert")
            lines[i] = line.split("#")[0] + " --kd-steps 2 --ssl-steps 2"
    return "\n".join(lines)


def environment(tmp_path: Path) -> dict:
    """``zmdevice`` and ``python`` on PATH run this checkout, offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shims = {"zmdevice": f'"{sys.executable}" -m zmdevice', "python": f'"{sys.executable}"'}
    for name, command in shims.items():
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ZMDEVICE_CACHE": str(tmp_path / "cache"),
    }


def run_blocks(shell_blocks: list[str], cwd: Path, env: dict) -> None:
    """Run the blocks in order in one shell (a variable one block sets, the next reads)."""
    script = "set -euo pipefail\n" + "\n".join(tiny_budget(block) for block in shell_blocks)
    result = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{script}\n{result.stderr[-3000:]}"


def test_the_readme_has_what_the_tests_run():
    (workflow,) = blocks(section("The workflow"), "bash")
    for command in ("zmdevice label", "zmdevice train", "zmdevice export", "zmdevice predict"):
        assert command in workflow
    assert "examples/" not in workflow and "export/app.py" not in workflow  # no checkout
    assert len(blocks(section("Python API"), "python")) == 1


def test_the_readme_is_a_front_door():
    """A front door (docs/style.md): short, the manual and the benchmark prose
    elsewhere."""
    assert len(README.splitlines()) <= 250
    for page in ("docs/cli.md", "docs/api.md", "docs/deploy.md", "docs/scaling.md"):
        assert f"]({page})" in README
    assert "benchmarks/RESULTS.md" in README


def test_the_readme_states_the_code_s_step_counts():
    """Every step count the README gives is the one the code runs, and each is given once."""
    from zmdevice.catalog import require_entry
    from zmdevice.config import DEFAULT_STUDENTS, MODALITY_DEFAULTS
    from zmdevice.demo import PLANS

    text, image = PLANS["text"], PLANS["image"]
    assert text.student == "distilbert" and image.student == "mobilenet_v3_small"
    demo = " ".join(section("The main job in two commands").split())
    assert f"text: {text.kd_steps[0]} + {text.ssl_steps[0]} steps" in demo
    assert f"images: {image.kd_steps[0]} + {image.ssl_steps[0]})" in demo
    quick = f"{text.kd_steps[1]} + {text.ssl_steps[1]} and {image.kd_steps[1]} + "
    assert quick + f"{image.ssl_steps[1]} steps" in demo

    image_default = require_entry(DEFAULT_STUDENTS["image"], "student", "--student")["train"]
    workflow = " ".join(section("The workflow").split())
    for numbers, what in (
        (MODALITY_DEFAULTS["text"], "steps for a text student"),
        (image_default, "for EfficientNet-Lite0 (the image default)"),
        (MODALITY_DEFAULTS["image"], "for the other image students"),
    ):
        assert f"{numbers['kd_steps']} + {numbers['ssl_steps']} {what}" in workflow
    # No other step count, and none twice.
    stated = [(int(a), int(b)) for a, b in re.findall(r"(\d+) \+ (\d+)", README)]
    known = [(plan.kd_steps[i], plan.ssl_steps[i]) for plan in (text, image) for i in (0, 1)]
    known += [(n["kd_steps"], n["ssl_steps"]) for n in (*MODALITY_DEFAULTS.values(), image_default)]
    assert sorted(stated) == sorted(known)


def test_the_readme_s_install_and_test_commands_are_ci_s():
    ci = (ROOT / ".ci" / "run").read_text()
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", ci).group(1)
    assert f"pip install {pins}" in README
    assert "python -m pytest -q" in ci and "python -m pytest -q" in section("Tests")
    assert "--index-url https://download.pytorch.org/whl/cpu" in section("Install")


@pytest.mark.slow
def test_workflow_commands_run_in_order(tmp_path):
    work = tmp_path / "anywhere"
    work.mkdir()
    run_blocks(blocks(section("The workflow"), "bash"), work, environment(tmp_path))
    labels = sorted(path.name for path in (work / "runs" / "labels").iterdir())
    assert labels == ["unlabeled-minilm-fewshot.parquet"]
    assert (work / "runs" / "export" / "text.onnx").is_file()
    assert (work / "runs" / "export" / "text.int8.onnx").is_file()
    # The labeling loop's block continues in the same folder (the student, the labels).
    text = blocks(section("The workflow"), "bash")[0].splitlines()[0]  # TEXT=...
    run_blocks([text, *blocks(section(LOOP), "bash")], work, environment(tmp_path))
    with open(work / "runs" / "next.csv", newline="", encoding="utf-8") as handle:
        suggested = list(csv.DictReader(handle))
    assert len(suggested) == 20 and all(row["student_guess"] for row in suggested)
    assert (work / "runs" / "label-check.csv").is_file()
    # And the ecosystem block: the saved Dataset folder labels as its CSV does.
    run_blocks([text, *blocks(section(TOOLS), "bash")], work, environment(tmp_path))
    from_folder = read_pseudolabels(work / "runs" / "labels" / "ds.parquet")
    from_csv = read_pseudolabels(work / "runs" / "labels" / "unlabeled-minilm-fewshot.parquet")
    assert from_folder.ids == from_csv.ids
    fingerprint = [labels.metadata["data"]["fingerprint"] for labels in (from_folder, from_csv)]
    assert fingerprint[0] == fingerprint[1]
    hub = sorted(path.name for path in (work / "runs" / "hub").iterdir())
    assert "README.md" in hub and any(name.endswith(".onnx") for name in hub)


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path):
    (example,) = blocks(section("Python API"), "python")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", example],
        cwd=empty,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from zmdevice.label_source import CANDIDATES

    first = result.stdout.splitlines()[0]
    assert first.split()[0] in CANDIDATES and "cv" not in first  # the source, its scores
    assert "'accuracy':" in first and "student: " in result.stdout
    assert (empty / "runs" / "export" / "api-text.onnx").is_file()
    assert (empty / "runs" / "export" / "api-text.README.md").is_file()
