"""`zmdevice suggest` and `zmdevice check` from the command line and the Python API: the same
configs and functions as tests/test_suggest.py and tests/test_check.py exercise directly."""

from __future__ import annotations

import csv
import json

import pytest
from loop_data import CLASSES, loop_data, write_labeled
from typer.testing import CliRunner

import zmdevice
from zmdevice.cli import app

runner = CliRunner()


@pytest.fixture
def loop(tmp_path):
    return loop_data(tmp_path)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_suggest_command_writes_a_table_that_round_trips_as_labeled(loop, monkeypatch):
    monkeypatch.chdir(loop["root"])
    args = ["suggest", str(loop["data"]), "--pseudo-labels", str(loop["labels"]),
            "--features", str(loop["features"]), "--n", "6", "--exclude", "s000,s001",
            "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == "suggestions.csv" and summary["mode"] == "cold start"
    rows = read_csv(loop["root"] / "suggestions.csv")
    assert len(rows) == 6 and not {"s000", "s001"} & {row["id"] for row in rows}
    # Labeled in a later round, the same ids are never suggested again.
    gold = dict(zip(loop["ids"], loop["gold"], strict=True))
    labeled = write_labeled(
        loop["root"] / "labeled.csv",
        [(r["id"], r["text"], CLASSES[gold[r["id"]]]) for r in rows],
    )
    again = runner.invoke(app, [*args[:-1], "--labeled", str(labeled), "--out", "round2.json",
                                "--format", "label-studio", "--json"])  # fmt: skip
    assert again.exit_code == 0, again.output
    tasks = json.loads((loop["root"] / "round2.json").read_text())
    assert len(tasks) == 6
    assert not {task["data"]["id"] for task in tasks} & {row["id"] for row in rows}


def test_check_command_and_api_rank_a_flipped_label_first(loop, monkeypatch):
    monkeypatch.chdir(loop["root"])
    pairs = zip(loop["ids"], loop["gold"], strict=True)
    rows = [(i, f"text {n}", CLASSES[g]) for n, (i, g) in enumerate(pairs)][:24]
    flipped = rows[3][0]
    gold = CLASSES.index(rows[3][2])
    rows[3] = (rows[3][0], rows[3][1], CLASSES[(gold + 1) % len(CLASSES)])
    labeled = write_labeled(loop["root"] / "labeled.csv", rows)
    result = runner.invoke(app, ["check", str(labeled), "--data", str(loop["data"]),
                                 "--pseudo-labels", str(loop["labels"]),
                                 "--features", str(loop["features"]), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    ranked = read_csv(loop["root"] / "label-check.csv")
    assert ranked[0]["id"] == flipped and ranked[0]["suggested"] == CLASSES[gold]
    summary = zmdevice.check(
        labeled, loop["data"], loop["labels"], features=loop["features"], out="api.csv"
    )
    assert summary["rows"][0]["id"] == flipped
    assert read_csv(loop["root"] / "api.csv") == ranked


def test_suggest_api_and_bad_input(loop, monkeypatch):
    monkeypatch.chdir(loop["root"])
    summary = zmdevice.suggest(
        loop["data"], loop["labels"], features=loop["features"], n=4, exclude=["s002"]
    )
    assert len(summary["rows"]) == 4 and "s002" not in {r["id"] for r in summary["rows"]}
    with pytest.raises(zmdevice.UserError, match="unknown"):
        zmdevice.suggest(loop["data"], loop["labels"], nn=4)
    bad = runner.invoke(app, ["suggest", str(loop["data"]), "--pseudo-labels", "missing.parquet"])
    assert (
        bad.exit_code == 2 and bad.stderr.startswith("error: ") and "missing.parquet" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1
