"""Label Studio files: tasks with pre-annotations, exports read back into labeled tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST
from loop_data import CLASSES, loop_data
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.curation.label_studio import (
    labeling_config,
    make_tasks,
    write_json,
    write_labeled_csv,
)
from zmdevice.data import label_indices, open_dataset
from zmdevice.errors import UserError
from zmdevice.label_studio_export import read_label_studio_export
from zmdevice.pseudolabels import read_pseudolabels


def annotation(choice, *, cancelled=False, updated="2024-05-01T10:00:00Z", from_name="label"):
    """One annotation as Label Studio exports it (labelstud.io/guide/task_format)."""
    return {
        "id": 1001,
        "result": [
            {
                "id": "Dx_aB91ISN",
                "from_name": from_name,
                "to_name": "text",
                "type": "choices",
                "value": {"choices": [choice] if isinstance(choice, str) else choice},
            }
        ],
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": updated,
        "updated_at": updated,
        "lead_time": 4.2,
        "task": 1,
        "completed_by": 10,
    }


def export_task(number, data, annotations):
    return {
        "id": number,
        "created_at": "2024-05-01T09:00:00Z",
        "updated_at": "2024-05-01T10:00:00Z",
        "project": 83,
        "data": data,
        "annotations": annotations,
        "predictions": [],
    }


def test_tasks_are_label_studio_json_with_choice_predictions(tmp_path):
    rows = [
        {"id": "a", "text": "the match", "fm_guess": "sports", "fm_confidence": 0.91,
         "score": 0.4, "reason": "cold start", "student_guess": ""},
        {"id": "b", "text": "a vote", "fm_guess": "politics", "fm_confidence": 0.55,
         "score": 0.3, "reason": "cold start", "student_guess": ""},
    ]  # fmt: skip
    path = write_json(tmp_path / "tasks.json", make_tasks(rows, "text", "zmdevice FM minilm"))
    tasks = json.loads(path.read_text(encoding="utf-8"))
    assert tasks[0] == {
        "data": {
            "id": "a",
            "text": "the match",
            "rank": 1,
            "suggest_score": 0.4,
            "reason": "cold start",
            "student_guess": "",
        },
        "predictions": [
            {
                "model_version": "zmdevice FM minilm",
                "score": 0.91,
                "result": [
                    {
                        "from_name": "label",
                        "to_name": "text",
                        "type": "choices",
                        "value": {"choices": ["sports"]},
                    }
                ],
            }
        ],
    }
    assert tasks[1]["data"]["rank"] == 2
    config = labeling_config(CLASSES, "text")
    assert '<Choices name="label" toName="text" choice="single">' in config
    assert '<Text name="text" value="$text"/>' in config
    assert all(f'<Choice value="{name}"/>' in config for name in CLASSES)


def test_an_export_of_our_tasks_reads_back_as_labeled_rows(tmp_path):
    loop = loop_data(tmp_path)
    data = open_dataset(loop["data"])
    export = [
        export_task(1, {"id": data.ids[0], "text": data.texts[0], "rank": 1},
                    [annotation("sports", updated="2024-05-01T10:00:00Z"),
                     annotation("science", updated="2024-05-02T10:00:00Z")]),
        export_task(2, {"id": data.ids[1], "text": data.texts[1]},
                    [annotation("politics"), annotation("sports", cancelled=True,
                                                        updated="2024-06-01T00:00:00Z")]),
        export_task(3, {"id": data.ids[2], "text": data.texts[2]}, []),
        export_task(4, {"id": data.ids[3], "text": data.texts[3]},
                    [annotation("sports", cancelled=True)]),
    ]  # fmt: skip
    path = write_json(tmp_path / "export.json", export)
    rows = read_label_studio_export(path)
    assert rows == [
        {"id": data.ids[0], "text": data.texts[0], "label": "science"},  # the latest one
        {"id": data.ids[1], "text": data.texts[1], "label": "politics"},  # not the cancelled
    ]
    table = write_labeled_csv(rows, tmp_path / "labeled.csv")
    labeled = open_dataset(table, require_labels=True)
    assert labeled.ids == [data.ids[0], data.ids[1]]
    assert label_indices(labeled, CLASSES).tolist() == [2, 1]
    direct = open_dataset(path, require_labels=True)  # --labeled export.json, no table in between
    assert (direct.ids, direct.texts, direct.labels) == (labeled.ids, labeled.texts, labeled.labels)


def test_image_exports_resolve_local_file_urls(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / name)
    export = [
        export_task(1, {"id": "a.png", "image": "/data/local-files/?d=imgs/a.png"},
                    [annotation("red")]),
        export_task(2, {"id": "b.png", "image": "http://x/b.png",
                        "path": str(tmp_path / "imgs" / "b.png")}, [annotation("blue")]),
    ]  # fmt: skip
    path = write_json(tmp_path / "export.json", export)
    rows = read_label_studio_export(path)
    assert [row["path"] for row in rows] == ["imgs/a.png", str(tmp_path / "imgs" / "b.png")]
    out = tmp_path / "tables" / "labeled.csv"
    write_labeled_csv(
        [dict(rows[0], path=str(tmp_path / "imgs" / "a.png")), rows[1]], out
    )  # paths relative to the CSV's folder
    labeled = open_dataset(out, require_labels=True)
    assert labeled.modality == "image" and labeled.labels == ["red", "blue"]
    assert labeled.load_image(1).size == (4, 4)
    dataset = open_dataset(path, modality="image", require_labels=True)
    assert dataset.ids == ["a.png", "b.png"] and dataset.load_image(0).size == (4, 4)


def test_suggested_label_studio_tasks_come_back_after_labeling(tmp_path):
    from zmdevice.curation.settings import SuggestConfig
    from zmdevice.curation.suggest import run_suggest

    loop = loop_data(tmp_path)
    out = tmp_path / "tasks.json"
    run_suggest(
        SuggestConfig(
            data=loop["data"],
            pseudo_labels=loop["labels"],
            features=loop["features"],
            out=out,
            n=5,
            format="label-studio",
        )  # fmt: skip
    )
    tasks = json.loads(out.read_text())
    # What Label Studio adds on export: its own ids and the annotations.
    for number, task in enumerate(tasks, start=1):
        guess = task["predictions"][0]["result"][0]["value"]["choices"][0]
        task.update(id=100 + number, annotations=[annotation(guess)])
    labeled = open_dataset(write_json(tmp_path / "export.json", tasks), require_labels=True)
    assert labeled.ids == [task["data"]["id"] for task in tasks]
    assert set(labeled.ids) <= set(open_dataset(loop["data"]).ids)
    again = run_suggest(
        SuggestConfig(
            data=loop["data"],
            pseudo_labels=loop["labels"],
            features=loop["features"],
            out=tmp_path / "next.csv",
            n=5,
            labeled=tmp_path / "export.json",
        )  # fmt: skip
    )
    assert not {row["id"] for row in again["rows"]} & set(labeled.ids)


def test_bad_exports_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_label_studio_export(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a JSON file"):
        read_label_studio_export(tmp_path / "bad.json")
    write_json(tmp_path / "min.json", {"text": "x", "label": "a"})
    with pytest.raises(UserError, match="list of tasks"):
        read_label_studio_export(tmp_path / "min.json")
    multi = [export_task(1, {"text": "x"}, [annotation(["a", "b"])])]
    with pytest.raises(UserError, match="2 choices"):
        read_label_studio_export(write_json(tmp_path / "multi.json", multi))
    two = annotation("a")
    two["result"].append(dict(two["result"][0], from_name="mood"))
    both = [export_task(1, {"text": "x"}, [two])]
    with pytest.raises(UserError, match="several controls"):
        read_label_studio_export(write_json(tmp_path / "two.json", both))
    assert read_label_studio_export(tmp_path / "two.json", from_name="mood")[0]["label"] == "a"
    mixed = [{"id": "a", "text": "x", "label": "s"}, {"id": None, "text": "y", "label": "s"}]
    with pytest.raises(UserError, match="no id"):
        write_labeled_csv(mixed, tmp_path / "mixed.csv")
    empty = [export_task(1, {"text": "x"}, [])]
    with pytest.raises(UserError, match="no annotated task"):
        open_dataset(write_json(tmp_path / "empty.json", empty), require_labels=True)


def label_studio_export_of(table: Path, out: Path) -> Path:
    """A Label Studio JSON export whose annotated tasks are ``table``'s labeled rows (with
    their zmdevice ids where the table has them), as a person labeling them would export."""
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    tasks = [
        {
            "id": number,
            "data": {key: row[key] for key in ("id", "text") if key in row},
            "annotations": [
                {"was_cancelled": False, "result": [{"from_name": "label", "to_name": "text",
                 "type": "choices", "value": {"choices": [row["label"]]}}]}
            ],
        }
        for number, row in enumerate(rows, start=1)
    ]  # fmt: skip
    return write_json(out, tasks)


def test_train_and_label_few_shot_take_a_label_studio_export_as_the_same_table(
    text_data, embed_dir, tmp_path, monkeypatch
):
    """``--labeled`` and ``--few-shot`` read the export a person filled in Label Studio
    exactly as the labeled table it holds: the same trained student, the same labels."""
    monkeypatch.chdir(tmp_path)
    export = label_studio_export_of(text_data / "labeled.csv", tmp_path / "export.json")
    settings = tmp_path / "fast.toml"
    settings.write_text("".join(f"{key} = {value}\n" for key, value in FAST.items()))
    runner = CliRunner()

    def train(labeled: Path, out: str) -> dict:
        result = runner.invoke(app, ["train", "--labeled", str(labeled), "--unlabeled",
                                     str(text_data / "unlabeled.csv"), "--test",
                                     str(text_data / "test.csv"), "--pseudo-labels",
                                     str(text_data / "labels.parquet"), "--student",
                                     "tiny-distilbert", "--kd-steps", "2", "--ssl-steps", "2",
                                     "--device", "cpu", "--config", str(settings), "--out", out,
                                     "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    from_export, from_table = train(export, "a"), train(text_data / "labeled.csv", "b")
    assert from_export["labeled"] == from_table["labeled"] == 6
    assert from_export["test_accuracy"] == from_table["test_accuracy"]

    def label(few_shot: Path, out: str):
        result = runner.invoke(app, ["label", str(text_data / "unlabeled.csv"), "--classes",
                                     ",".join(sorted({*open_dataset(few_shot,
                                     require_labels=True).labels})), "--teacher",
                                     f"text-embed:{embed_dir}", "--device", "cpu", "--workers",
                                     "0", "--few-shot", str(few_shot), "--out", out])  # fmt: skip
        assert result.exit_code == 0, result.output
        return read_pseudolabels(out)

    a, b = label(export, "a.parquet"), label(text_data / "labeled.csv", "b.parquet")
    assert a.ids == b.ids and np.array_equal(a.topk_prob, b.topk_prob)
