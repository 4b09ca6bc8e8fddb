"""The README's commands and its Python example run as written.

The ``bash`` blocks of "The workflow" are run in order, from a folder laid out like the
repository root (``examples/`` and ``export/app.py`` linked in), on the embedded default
data, with the real offline FMs. Only the budgets shrink: every ``zmdevice train`` gets
``--kd-steps 2 --ssl-steps 2`` and the DistilBERT student becomes ``tiny-distilbert``. The
``python`` block of "Python API" runs exactly as written, from an empty folder.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text from the ``## title`` heading to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


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
    """``zmdevice`` on PATH runs this checkout, offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "zmdevice"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m zmdevice "$@"\n')
    shim.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ZMDEVICE_CACHE": str(tmp_path / "cache"),
    }


def workflow_blocks() -> list[str]:
    """The runnable blocks: "The workflow" up to its "Embed in apps" part (npm, servers),
    without the "Scaling out" parts (they start Ray clusters and torchrun on other hosts)."""
    workflow = section("The workflow").split("\n### Embed in apps")[0]
    parts = workflow.split("\n### ")
    return [b for part in parts if not part.startswith("Scaling out") for b in blocks(part, "bash")]


def test_the_readme_has_what_the_tests_run():
    workflow = workflow_blocks()
    assert len(workflow) >= 3
    commands = " ".join(workflow)
    for command in ("zmdevice label", "zmdevice train", "zmdevice export", "zmdevice predict"):
        assert command in commands
    assert len(blocks(section("Python API"), "python")) == 1


@pytest.mark.slow
def test_workflow_commands_run_in_order(tmp_path):
    work = tmp_path / "repo"
    (work / "export").mkdir(parents=True)
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "export" / "app.py").symlink_to(ROOT / "export" / "app.py")
    env = environment(tmp_path)
    for number, block in enumerate(workflow_blocks(), start=1):
        script = "set -euo pipefail\n" + tiny_budget(block)
        result = subprocess.run(
            ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"block {number}:\n{script}\n{result.stderr[-3000:]}"
    # The two label runs wrote two files: the image labels did not overwrite the text ones.
    labels = sorted(path.name for path in (work / "labels").iterdir())
    expected = ["unlabeled-efficientnet-lite0-fewshot.parquet", "unlabeled-minilm-fewshot.parquet"]
    assert labels == expected
    assert (work / "export" / "images.README.md").is_file()


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
    assert (empty / "export" / "api-text.onnx").is_file()
    assert (empty / "export" / "api-text.README.md").is_file()
