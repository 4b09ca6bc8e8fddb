"""`suggest`: cold-start coverage, later-round uncertainty, determinism, exclusion, the
round trip back to a labeled table, the FM feature cache."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from loop_data import CLASSES, loop_data, write_labeled

from zmdevice.curation.settings import SuggestConfig
from zmdevice.curation.suggest import (
    cold_start,
    committee_scores,
    exclude_ids,
    far_typical,
    filled_suggestions,
    run_suggest,
    uncertain_diverse,
)
from zmdevice.data import label_indices, open_dataset
from zmdevice.errors import UserError


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def loop(tmp_path):
    return loop_data(tmp_path)


def config(loop, **changes):
    values = dict(
        data=loop["data"],
        pseudo_labels=loop["labels"],
        out=loop["root"] / "next.csv",
        features=loop["features"],
        n=9,
    )
    values.update(changes)
    return SuggestConfig(**values)


def test_cold_start_covers_every_fm_class_in_its_first_rows(loop):
    summary = run_suggest(config(loop))
    rows = read_csv(loop["root"] / "next.csv")
    assert summary["mode"] == "cold start"
    assert len(rows) == 9
    assert list(rows[0]) == [
        "id", "text", "fm_guess", "student_guess", "score", "reason", "label",
    ]  # fmt: skip
    fm_classes = {CLASSES[c] for c in loop["fm"].argmax(axis=1)}
    assert {row["fm_guess"] for row in rows[: len(fm_classes)]} == fm_classes
    assert all(row["label"] == "" and row["student_guess"] == "" for row in rows)
    assert all(row["reason"].startswith("cold start") for row in rows)
    assert len({row["id"] for row in rows}) == 9


def test_cold_start_picks_typical_points_of_distinct_clusters():
    # Two tight clusters inside class 0 and one outlier: two picks take one per cluster,
    # never the outlier.
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0]) + 0.01 * rng.standard_normal((10, 3))
    b = np.array([0, 1.0, 0]) + 0.01 * rng.standard_normal((10, 3))
    outlier = np.array([[0.0, 0, 1.0]])
    x = np.concatenate([a, b, outlier]).astype(np.float32)
    probs = np.tile([0.9, 0.1], (len(x), 1))
    ranked = cold_start(x, probs, 2, seed=3)
    assert sorted(int(i) // 10 for i in ranked.index) == [0, 1]


def test_cold_start_skips_regions_a_labeled_example_covers_and_ignores_a_random_fm():
    # Eight tight regions; the FM's guesses are random, so its classes overlap everywhere.
    rng = np.random.default_rng(1)
    x = np.concatenate([c + 0.01 * rng.standard_normal((10, 8)) for c in np.eye(8)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    probs = rng.dirichlet(np.ones(2), size=len(x)).astype(np.float32)
    ranked = cold_start(x, probs, 4, seed=0)  # 8 clusters: one per region
    assert len({int(i) // 10 for i in ranked.index}) == 4  # four regions, not one
    # Labeled examples in regions 0 and 1 (2 + 2 x 3 clusters): no pick lands there.
    labeled = cold_start(x, probs, 3, labeled_x=x[[0, 10]], seed=0)
    assert len({int(i) // 10 for i in labeled.index} - {0, 1}) == 3
    assert all("no labeled example covers" in reason for reason in labeled.reason)
    again = cold_start(x, probs, 3, labeled_x=x[[0, 10]], seed=0)
    np.testing.assert_array_equal(labeled.index, again.index)  # one seed, one answer


def test_cold_start_fills_its_quota_among_duplicates():
    x = np.tile(np.float32([1, 1, 1]) / np.sqrt(3), (10, 1))
    x[9] = [1, 0, 0]
    ranked = cold_start(x, np.tile([0.9, 0.1], (10, 1)), 4, seed=0)
    assert len(set(ranked.index.tolist())) == 4 and 9 in ranked.index


def test_same_seed_same_file(loop):
    run_suggest(config(loop, seed=7))
    first = (loop["root"] / "next.csv").read_bytes()
    run_suggest(config(loop, seed=7))
    assert (loop["root"] / "next.csv").read_bytes() == first


def test_exclude_and_labeled_ids_are_never_suggested(loop):
    labeled = write_labeled(loop["root"] / "labeled.csv", loop["rows"][:4])
    everything = run_suggest(config(loop, n=len(loop["ids"])))
    excluded = [row["id"] for row in everything["rows"][:5]]
    summary = run_suggest(
        config(loop, n=len(loop["ids"]), exclude=[*excluded, "nope"], labeled=labeled)
    )
    suggested = {row["id"] for row in summary["rows"]}
    assert not suggested & set(excluded)
    assert not suggested & {row[0] for row in loop["rows"][:4]}
    assert len(suggested) == len(loop["ids"]) - len(set(excluded) | set(loop["ids"][:4]))
    assert summary["unknown_excluded"] == ["nope"]


def test_exclude_ids_reads_lists_files_and_previous_suggestions(loop, tmp_path):
    assert exclude_ids("a, b") == ("a", "b")
    (tmp_path / "ids.txt").write_text("# done\ns001\n\ns002\n")
    assert exclude_ids(tmp_path / "ids.txt") == ("s001", "s002")
    run_suggest(config(loop))
    ids = exclude_ids(loop["root"] / "next.csv")
    assert len(ids) == 9 and ids[0].startswith("s")
    with pytest.raises(UserError, match="no such file"):
        exclude_ids(tmp_path / "missing.csv")
    # Each --exclude value may be a comma list or a file; a suggestion run reads them all.
    summary = run_suggest(
        config(loop, n=len(loop["ids"]), exclude=["s001,s002", str(tmp_path / "ids.txt")])
    )
    assert not {"s001", "s002"} & {row["id"] for row in summary["rows"]}


def test_filled_suggestions_are_a_labeled_table(loop):
    run_suggest(config(loop))
    path = loop["root"] / "next.csv"
    rows = read_csv(path)
    gold = dict(zip(loop["ids"], loop["gold"], strict=True))
    for row in rows:
        row["label"] = CLASSES[gold[row["id"]]]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labeled = open_dataset(path, require_labels=True)  # the --labeled reader
    data = open_dataset(loop["data"])
    assert set(labeled.ids) <= set(data.ids)
    assert labeled.texts == [data.texts[data.ids.index(i)] for i in labeled.ids]
    truth = label_indices(labeled, CLASSES)
    assert truth.tolist() == [gold[i] for i in labeled.ids]
    # The filled file feeds the next round: a later round that skips what is labeled.
    later = run_suggest(config(loop, labeled=path, out=loop["root"] / "round2.csv"))
    assert later["mode"] == "uncertainty"
    assert not {r["id"] for r in later["rows"]} & set(labeled.ids)


def test_partly_filled_suggestions_keep_the_labeled_rows(loop):
    run_suggest(config(loop))
    path = loop["root"] / "next.csv"
    rows = read_csv(path)
    rows[1]["label"] = "politics"
    rows[4]["label"] = " science "
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match="has no label"):
        open_dataset(path, require_labels=True)
    summary = filled_suggestions(path, loop["root"] / "labeled.csv")
    assert (summary["kept"], summary["left_empty"]) == (2, 7)
    labeled = open_dataset(loop["root"] / "labeled.csv", require_labels=True)
    assert labeled.ids == [rows[1]["id"], rows[4]["id"]]
    assert labeled.labels == ["politics", "science"]


def test_committee_scores_rank_disagreement_and_uncertainty():
    fm = np.array([[0.9, 0.1], [0.55, 0.45], [0.9, 0.1]])
    student = np.array([[0.9, 0.1], [0.55, 0.45], [0.1, 0.9]])
    score, margin, js = committee_scores({"FM": fm, "student": student})
    assert score[0] < score[1] and score[0] < score[2]
    assert js[0] == pytest.approx(0) and js[2] > 0.3
    assert margin[1] == pytest.approx(0.1)


def test_later_round_prefers_disputed_samples_and_stays_diverse():
    # 40 points on 4 directions; the student disputes the FM on rows 0-9, all in one
    # tight spot: diversity must not spend every slot there.
    rng = np.random.default_rng(0)
    direction = np.repeat(np.eye(4), 10, axis=0)
    x = direction + 0.05 * rng.standard_normal((40, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fm = np.tile([0.7, 0.1, 0.1, 0.1], (40, 1))
    student = fm.copy()
    student[:10] = [0.1, 0.7, 0.1, 0.1]
    student[20:30] = [0.45, 0.35, 0.1, 0.1]  # agrees, but less sure
    ranked = uncertain_diverse(x, {"FM": fm, "student": student}, 4, candidates=5)
    assert int(ranked.index[0]) < 10
    assert "disagree" in ranked.reason[0]
    assert any(20 <= int(i) < 30 for i in ranked.index[:2])
    assert sum(int(i) < 10 for i in ranked.index) < 4
    # Without the diversity pass the disputed spot would take every slot.
    plain = uncertain_diverse(x, {"FM": fm, "student": student}, 4, candidates=1)
    assert all(int(i) < 10 for i in plain.index)


def test_a_class_nobody_labeled_is_sought_first_with_the_fm_where_it_beats_chance(loop):
    # Eight labels of sports and politics, none of science; the FM is right on ~80%, and
    # on enough of the eight to beat chance (binomial test).
    gold, rows = loop["gold"], loop["rows"]
    known = [i for i in range(len(rows)) if gold[i] != 2][:8]
    assert (loop["fm"][known].argmax(axis=1) == gold[known]).sum() >= 6
    labeled = write_labeled(loop["root"] / "labeled.csv", [rows[i] for i in known])
    summary = run_suggest(config(loop, labeled=labeled, n=4))
    first = summary["rows"][0]
    assert first["reason"].startswith("no labeled example of science")
    science = [i for i in range(len(rows)) if loop["fm"][i].argmax() == 2 and i not in known]
    best = max(science, key=lambda i: loop["fm"][i, 2])  # the FM's most confident science
    assert first["id"] == loop["ids"][best]
    assert summary["discovery"] == 1 and summary["mode"] == "uncertainty"
    assert any("look for the 1 classes without a labeled example" in line
               for line in summary["lines"])  # fmt: skip
    # Every class labeled: nothing is sought.
    every = [i for c in range(3) for i in np.flatnonzero(gold == c)[:2]]
    full = write_labeled(loop["root"] / "full.csv", [rows[i] for i in every])
    assert run_suggest(config(loop, labeled=full, n=4))["discovery"] == 0


def test_an_fm_no_better_than_chance_leaves_the_search_to_the_regions_labels_miss(loop, tmp_path):
    # The same data with an FM right on a third of it (3 classes: chance): the picks of a
    # round with labels of two classes are typical points far from them, and reach the
    # third class's cluster at once.
    weak = loop_data(tmp_path, correct=1 / 3, seed=2)
    gold, rows = weak["gold"], weak["rows"]
    known = [i for c in (0, 1) for i in np.flatnonzero(gold == c)[:1]]
    labeled = write_labeled(tmp_path / "labeled.csv", [rows[i] for i in known])
    summary = run_suggest(config(weak, labeled=labeled, n=3))
    assert summary["mode"] == "cold start, far from the labels"
    assert all(r["reason"].startswith("far from every labeled example") for r in summary["rows"])
    position = {sample_id: i for i, sample_id in enumerate(weak["ids"])}
    assert gold[position[summary["rows"][0]["id"]]] == 2


def test_far_typical_goes_farthest_first_and_spreads_its_picks():
    rng = np.random.default_rng(0)
    x = np.concatenate([c + 0.01 * rng.standard_normal((10, 4)) for c in np.eye(4)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labeled_x = x[[0, 10]]  # regions 0 and 1 known
    allowed = np.ones(len(x), bool)
    allowed[[0, 10]] = False
    ranked = far_typical(x, 2, allowed=allowed, labeled_x=labeled_x, seed=0)
    assert sorted(int(i) // 10 for i in ranked.index) == [2, 3]  # one pick per new region
    assert ranked.score[0] >= ranked.score[1] > 0.5
    again = far_typical(x, 2, allowed=allowed, labeled_x=labeled_x, seed=0)
    np.testing.assert_array_equal(ranked.index, again.index)


def test_label_studio_tasks_follow_the_documented_format(loop):
    out = loop["root"] / "tasks.json"
    run_suggest(config(loop, format="label-studio", out=out))
    tasks = json.loads(out.read_text())
    assert isinstance(tasks, list) and len(tasks) == 9
    data = open_dataset(loop["data"])
    for task in tasks:
        assert set(task) == {"data", "predictions"}
        assert task["data"]["text"] == data.texts[data.ids.index(task["data"]["id"])]
        (prediction,) = task["predictions"]
        assert set(prediction) == {"model_version", "score", "result"}
        assert 0 <= prediction["score"] <= 1
        (result,) = prediction["result"]
        assert result["from_name"] == "label" and result["to_name"] == "text"
        assert result["type"] == "choices"
        assert result["value"]["choices"][0] in CLASSES


def test_student_joins_the_committee(loop, tmp_path):
    from zmdevice.students import build_student, save_student

    save_student(build_student("tiny-distilbert", CLASSES, seed=0), tmp_path / "student")
    labeled = write_labeled(loop["root"] / "labeled.csv", loop["rows"][:3])
    summary = run_suggest(config(loop, student=tmp_path / "student", labeled=labeled))
    assert summary["mode"] == "uncertainty"
    assert all(row["student_guess"] in CLASSES for row in summary["rows"])


def test_bad_inputs_are_one_line_errors(loop, tmp_path):
    wrong = write_labeled(tmp_path / "wrong.csv", [("s000", "x", "cooking")])
    with pytest.raises(UserError, match="cooking"):
        run_suggest(config(loop, labeled=wrong))
    with pytest.raises(UserError, match="does not exist"):
        run_suggest(config(loop, pseudo_labels=tmp_path / "none.parquet"))
    np.save(tmp_path / "short.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(UserError, match="shape"):
        run_suggest(config(loop, features=tmp_path / "short.npy"))
    (tmp_path / "other").mkdir()
    other = loop_data(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="other data"):
        run_suggest(config(loop, pseudo_labels=other["labels"]))
    with pytest.raises(UserError, match="format"):
        config(loop, format="xlsx")
    assert not (loop["root"] / "next.csv").exists()


def test_fm_features_come_from_the_label_files_teacher_once(tmp_path, embed_dir, monkeypatch):
    from helpers import TOPIC_NAMES, write_texts

    from zmdevice.classes import load_classes
    from zmdevice.curation import fm_space
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

    data = write_texts(tmp_path / "data.csv", 12)
    dataset = open_dataset(data)
    spec = f"text-embed:{embed_dir}"
    classes = load_classes(TOPIC_NAMES)
    features, probs = fm_space.fm_outputs(dataset, spec, classes)
    assert features.shape[0] == 12 and probs.shape == (12, 3)
    metadata = build_metadata(
        classes=classes.names,
        teacher={"spec": spec},
        data={"fingerprint": dataset.fingerprint()},
        top_k=3,
    )
    with PseudoLabelWriter(tmp_path / "labels.parquet", metadata) as writer:
        writer.write_probs(dataset.ids, probs)
    cached = sorted(fm_space.cache_dir().glob("*.features.npy"))
    assert cached and np.load(cached[0]).dtype == np.float16

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran again: the cache was not used")

    monkeypatch.setattr(fm_space, "_build", no_teacher)
    summary = run_suggest(
        SuggestConfig(
            data=data, pseudo_labels=tmp_path / "labels.parquet", out=tmp_path / "s.csv", n=4
        )
    )
    assert summary["space"] == "features" and len(summary["rows"]) == 4
    again, _ = fm_space.fm_outputs(dataset, spec, classes, probs=False)
    np.testing.assert_allclose(again, features, atol=2e-3 * np.abs(features).max())


def test_image_suggestions_round_trip_and_label_studio_image_tasks(tmp_path):
    from helpers import write_pseudolabels
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    folder = tmp_path / "images"
    folder.mkdir()
    names = list(colours)
    for i in range(9):
        image = np.zeros((8, 8, 3), np.uint8) + np.array(colours[names[i % 3]], np.uint8)
        Image.fromarray(image).save(folder / f"im{i}.png")
    data = open_dataset(folder)
    gold = [int(sample_id[2]) % 3 for sample_id in data.ids]  # im<i>.png has colour i % 3
    probs = np.full((9, 3), 0.1, np.float32)
    probs[np.arange(9), gold] = 0.8
    labels = write_pseudolabels(
        tmp_path / "labels.parquet", data.ids, names, data.fingerprint(), probs
    )
    np.save(tmp_path / "f.npy", np.eye(3)[gold] + 0.01 * np.arange(9)[:, None], allow_pickle=False)
    out = tmp_path / "round" / "next.csv"
    base = dict(data=folder, pseudo_labels=labels, features=tmp_path / "f.npy", n=4)
    run_suggest(SuggestConfig(out=out, **base))
    rows = read_csv(out)
    assert list(rows[0])[:2] == ["id", "path"]
    assert {row["fm_guess"] for row in rows[:3]} == set(names)
    for row in rows:
        row["label"] = row["fm_guess"]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labeled = open_dataset(out, require_labels=True)
    assert labeled.modality == "image" and set(labeled.ids) <= set(data.ids)
    assert labeled.load_image(0).getpixel((0, 0)) == colours[labeled.labels[0]]
    tasks_path = tmp_path / "tasks.json"
    run_suggest(SuggestConfig(out=tasks_path, format="label-studio", **base))
    tasks = json.loads(tasks_path.read_text())
    for task in tasks:
        assert task["data"]["image"] == "/data/local-files/?d=" + task["data"]["id"]
        assert (folder / task["data"]["id"]).samefile(task["data"]["path"])
        assert task["predictions"][0]["result"][0]["to_name"] == "image"


def test_a_teacher_without_features_gives_a_probability_space(tmp_path):
    import tiny_teachers
    from helpers import TOPIC_NAMES, write_pseudolabels, write_texts

    from zmdevice.curation.fm_space import fm_outputs, load_space, unit_rows

    spec = f"nli:{tiny_teachers.make_nli(tmp_path / 'nli')}"
    data = open_dataset(write_texts(tmp_path / "data.csv", 9))
    labels = write_pseudolabels(
        tmp_path / "labels.parquet", data.ids, TOPIC_NAMES.split(","), data.fingerprint()
    )
    labeled = write_labeled(
        tmp_path / "labeled.csv", [("x1", "the game team", "sports"), ("x2", "a vote", "politics")]
    )
    space = load_space(data.source, labels, labeled, teacher=spec)
    assert space.kind == "probabilities"
    np.testing.assert_allclose(np.sum(space.x**2, axis=1), 1.0, rtol=1e-5)
    # The labeled examples are not in the data: the teacher gave their probabilities.
    from zmdevice.classes import load_classes

    features, probs = fm_outputs(space.labeled, spec, load_classes(TOPIC_NAMES))
    assert features is None
    np.testing.assert_allclose(space.labeled_probs, probs, atol=1e-3)
    np.testing.assert_allclose(space.labeled_x, unit_rows(None, probs), atol=1e-3)


def test_the_space_rebuilds_the_teacher_by_the_name_it_was_labeled_with(tmp_path, monkeypatch):
    # efficientnet-lite0 labels Fashion-MNIST through its catalog entry's class map; its
    # resolved spec alone has no entry, and would have no map.
    from helpers import TOPIC_NAMES, write_pseudolabels, write_texts

    from zmdevice.curation import fm_space

    data = open_dataset(write_texts(tmp_path / "data.csv", 9))
    teacher = {"name": "efficientnet-lite0", "spec": "imagenet:tf_efficientnet_lite0:/w.pth"}
    labels = write_pseudolabels(
        tmp_path / "labels.parquet", data.ids, TOPIC_NAMES.split(","), data.fingerprint(),
        teacher=teacher,
    )  # fmt: skip
    asked = []

    def outputs(dataset, spec, *args, **options):
        asked.append(spec)
        return None, None

    monkeypatch.setattr(fm_space, "fm_outputs", outputs)
    fm_space.load_space(data.source, labels)
    assert asked == ["efficientnet-lite0"]
