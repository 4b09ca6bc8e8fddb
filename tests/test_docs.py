"""The manual in docs/: its links resolve, its numbers are the code's, its commands run.

The ``bash`` blocks of docs/cli.md run in order in one shell from an empty folder, on the
embedded default images, with the real offline FM and tiny training budgets (as the
README's workflow does in tests/test_readme.py).
"""

import re
from pathlib import Path

import pytest
from test_readme import blocks, environment, run_blocks, section

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/RESULTS.md"]
CLI = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def test_the_manual_states_the_code_s_defaults():
    from zmdevice.catalog import require_entry
    from zmdevice.config import DEFAULT_STUDENTS, MODALITY_DEFAULTS
    from zmdevice.demo import PLANS

    train = " ".join(section("zmdevice train", CLI).split())
    image_default = require_entry(DEFAULT_STUDENTS["image"], "student", "--student")["train"]
    for numbers, what in (
        (MODALITY_DEFAULTS["text"], "for a text student"),
        (image_default, f"for `{DEFAULT_STUDENTS['image']}`, the image default"),
        (MODALITY_DEFAULTS["image"], "for the other image students"),
    ):
        assert f"{numbers['kd_steps']} + {numbers['ssl_steps']} {what}" in train
    demo = " ".join(section("zmdevice demo", CLI).split())
    for modality, plan in PLANS.items():
        full, quick = (f"{plan.kd_steps[i]} + {plan.ssl_steps[i]}" for i in (0, 1))
        assert f"`{plan.student}`, {full}" in demo and f"`--quick` {quick}" in demo, modality


def test_the_manual_has_what_the_tests_run():
    commands = " ".join(blocks(CLI, "bash"))
    for command in ("zmdevice label", "zmdevice train", "zmdevice export", "zmdevice predict"):
        assert command in commands
    assert "examples/" not in commands and "export/app.py" not in commands  # no checkout


@pytest.mark.slow
def test_manual_commands_run_in_order(tmp_path):
    work = tmp_path / "anywhere"
    work.mkdir()
    run_blocks(blocks(CLI, "bash"), work, environment(tmp_path))
    labels = sorted(path.name for path in (work / "runs" / "labels").iterdir())
    assert labels == ["unlabeled-efficientnet-lite0-fewshot.parquet"]
    assert (work / "runs" / "export" / "images.onnx").is_file()
    assert (work / "runs" / "export" / "images.README.md").is_file()
