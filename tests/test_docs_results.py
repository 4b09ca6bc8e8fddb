"""benchmarks/RESULTS.md's opening table (``paper.py table``): one row per data set and
labels/class, the default against its best peer, the spread and the seeds said."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import paper  # noqa: E402


def result(dataset: str, method: str, seed: int, accuracy: float, k: int = 4) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "labels_per_class": k,
        "split": "test",
        "test_accuracy": accuracy,
    }


def rows_of(results: list[dict], names: list[str]) -> list[str]:
    datasets = [paper.ALL_DATASETS[name] for name in names]
    return paper._headline(results, datasets)[2:]


def test_the_default_flow_against_its_best_peer():
    results = [
        {"dataset": "text-verbs", "method": "fm-zero-shot", "split": "test", "test_accuracy": 0.3},
        *(result("text-verbs", paper.DEFAULT_FLOW, s, a) for s, a in enumerate((0.40, 0.42, 0.44))),
        *(result("text-verbs", "kd-auto", s, a) for s, a in enumerate((0.38, 0.39, 0.40))),
        *(result("text-verbs", "setfit", s, a) for s, a in enumerate((0.30, 0.31, 0.32))),
        # A ZeroMatch variant is no peer, however high it scores.
        *(result("text-verbs", "zeromatch-rf", s, 0.9) for s in range(3)),
    ]
    (row,) = rows_of(results, ["text-verbs"])
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:4] == ["text-verbs", "4", f"`{paper.DEFAULT_FLOW}`", "42.0 (40.0-44.0, 3 seeds)"]
    assert cells[4] == "`kd-auto` (best of 3)" and cells[5] == "39.0 (38.0-40.0, 3 seeds)"
    assert cells[6] == "ahead by 3.0 on every seed"


def test_rows_with_fewer_seeds_say_how_many():
    results = [
        result("text", "zeromatch-rf", 0, 0.80),
        result("text", "kd-rf", 0, 0.81),
        result("text", "kd-rf", 1, 0.83),
    ]
    (row,) = rows_of(results, ["text"])
    assert "80.0 (1 seed)" in row and "82.0 (81.0-83.0, 2 seeds)" in row
    assert row.rstrip(" |").endswith("behind by 2.0 (1 seed only)")


def test_the_fm_alone_and_a_data_set_without_a_default():
    results = [
        {"dataset": "text-pos4", "method": "fm-zero-shot", "split": "test", "test_accuracy": 0.5},
        *(result("text-pos4", paper.DEFAULT_FLOW, s, 0.5) for s in range(3)),
        result("text-nouns25", "probe-true", 0, 0.6),
    ]
    (row,) = rows_of(results, ["text-pos4", "text-nouns25"])
    assert "FM zero-shot (best of 1)" in row and "50.0 (no training)" in row
    assert row.rstrip(" |").endswith("level")
