"""benchmarks/decisions.py: a default chosen by its mean over the domains' dev runs, with the
leave-one-domain-out and per-seed checks that RESULTS.md prints."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import decisions  # noqa: E402

DECISION = decisions.Decision(
    "Stage 2 ends on a weight average",
    ("last", "average"),
    setting="ssl_weight_average",
    values=(0.0, 1.0),
    cells=decisions._cells({
        ("text", 4): ("zm", "zm-avg"),
        ("text", 1): ("zm", "zm-avg"),
        ("images", 4): ("zm", "zm-avg"),
        ("digits", 4): ("zm", "zm-avg"),
        ("digits", 1): ("zm", "zm-avg"),
    }),
)  # fmt: skip


def dev(dataset: str, method: str, k: int, accuracies: tuple[float, ...]) -> list[dict]:
    return [
        {"dataset": dataset, "method": method, "labels_per_class": k, "seed": seed,
         "split": "dev", "dev_accuracy": accuracy}
        for seed, accuracy in enumerate(accuracies)
    ]  # fmt: skip


def test_domains_weigh_the_same_and_one_domain_can_flip_the_choice():
    results = [
        # text: two settings, each +1 for the average -> the domain's +1.
        *dev("text", "zm", 4, (0.80, 0.80, 0.80)), *dev("text", "zm-avg", 4, (0.81,) * 3),
        *dev("text", "zm", 1, (0.70, 0.70, 0.70)), *dev("text", "zm-avg", 1, (0.71,) * 3),
        # images: -0.5
        *dev("images", "zm", 4, (0.60, 0.60, 0.60)), *dev("images", "zm-avg", 4, (0.595,) * 3),
        # digits at 4 only on the seeds both options share (0 and 1): +10.
        *dev("digits", "zm", 4, (0.50, 0.50, 0.10)), *dev("digits", "zm-avg", 4, (0.60, 0.60)),
    ]  # fmt: skip
    found = decisions.screen(DECISION, results)
    assert found.detail == {"text": "4: 3 seeds, 1: 3 seeds", "images": "4: 3 seeds",
                            "digits": "4: 2 seeds"}  # fmt: skip
    assert abs(found.domains["digits"][1] - found.domains["digits"][0] - 0.10) < 1e-9
    assert found.missing == ["digits at 1"]
    assert found.choice() == 1
    # Without digits the mean is (+1 - 0.5) / 2 > 0: still the average; without text too.
    assert found.choice(without="digits") == 1 and found.choice(without="text") == 1
    # Seed 2 has no digits run for the average: text +1 and images -0.5 still pick it.
    assert found.choice(seed=2) == 1
    text = "\n".join(decisions.render(found))
    ships = "(the shipped option)" if DECISION.shipped == 1 else "(not what ships)"
    assert f"The mean picks **average** {ships}" in text
    assert "leaving out any one domain gives the same choice" in text
    assert "not yet screened: digits at 1" in text


def test_a_choice_that_hangs_on_one_domain_or_one_seed_is_said():
    results = [
        *dev("text", "zm", 4, (0.80, 0.80, 0.80)), *dev("text", "zm-avg", 4, (0.79, 0.79, 0.79)),
        *dev("images", "zm", 4, (0.60, 0.60, 0.60)), *dev("images", "zm-avg", 4, (0.59,) * 3),
        # Digits alone carries the average, and only on seed 0.
        *dev("digits", "zm", 4, (0.50, 0.50, 0.50)), *dev("digits", "zm-avg", 4, (0.80, 0.5, 0.5)),
    ]  # fmt: skip
    found = decisions.screen(DECISION, results)
    assert found.choice() == 1 and found.choice(without="digits") == 0
    assert [found.choice(seed=s) for s in range(3)] == [1, 0, 0]
    text = "\n".join(decisions.render(found))
    assert "**last (-1.00)** (differs)" in text
    assert "leaving out digits would change the choice" in text
    assert "(the choice flips between seeds)" in text


def test_a_tie_keeps_what_ships_and_no_runs_render_nothing():
    results = [*dev("text", "zm", 4, (0.8,)), *dev("text", "zm-avg", 4, (0.8,))]
    found = decisions.screen(DECISION, results)
    assert found.choice() == DECISION.shipped
    assert decisions.render(decisions.screen(DECISION, [])) == []


def test_every_declared_option_names_a_benchmark_method():
    import paper

    for decision in decisions.DECISIONS:
        assert len(decision.values) == len(decision.options)
        assert 0 <= decision.shipped < len(decision.options)
        for cell in decision.cells:
            assert cell.dataset in paper.ALL_DATASETS
            assert len(cell.methods) == len(decision.options)
            assert all(method in paper.ALL_METHODS for method in cell.methods)
