"""`zmdevice label` end to end on tiny teachers: output, gold report, resume, shards, errors."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOPIC_NAMES, TOPIC_WORDS, write_table, write_texts
from PIL import Image
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.config import DataOptions, LabelConfig
from zmdevice.errors import UserError
from zmdevice.labeling.run import parse_shard, run_label, shard_range
from zmdevice.pseudolabels import read_pseudolabel_metadata, read_pseudolabels

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path, embed_dir, **kw):
    values = dict(
        data=tmp_path / "texts.csv",
        classes=TOPIC_NAMES,
        teacher=f"text-embed:{embed_dir}",
        out=tmp_path / "out.parquet",
        batch_size=4,
        device="cpu",
        workers=0,
    )
    values.update(kw)
    return LabelConfig(**values)


def content(path):
    """Rows and metadata of a pseudo-label file, minus what differs between runs."""
    labels = read_pseudolabels(path)
    meta = {k: v for k, v in labels.metadata.items() if k not in ("created", "path")}
    return labels.ids, labels.label, labels.topk_idx, labels.topk_prob, meta


def assert_same_content(a, b):
    for x, y in zip(content(a)[:4], content(b)[:4], strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert content(a)[4] == content(b)[4]


def test_gold_samples_already_labeled_reuse_their_pseudo_label(tmp_path, embed_dir, monkeypatch):
    """--gold naming (a gold copy of) the labeled data costs no second teacher pass."""
    from zmdevice.labeling import batches, gold, local_engine

    write_texts(tmp_path / "texts.csv", 12, labels=True)
    write_texts(tmp_path / "gold.csv", 14, labels=True)  # 12 shared ids + 2 new ones
    seen = []

    def counting(dataset, teacher, indices, batch_size, workers, *features):
        seen.append(len(list(indices)))
        yield from batches.iterate_batches(
            dataset, teacher, indices, batch_size, workers, *features
        )

    for module in (local_engine, gold):  # the labeling pass and the gold report
        monkeypatch.setattr(module, "iterate_batches", counting)
    summary = run_label(config(tmp_path, embed_dir, gold=tmp_path / "gold.csv"))
    assert seen == [12, 2]  # the data, then only the two gold samples it did not hold
    labels = read_pseudolabels(tmp_path / "out.parquet")
    names = TOPIC_NAMES.split(",")
    truth = [names[i % 3] for i in range(12)]
    correct_shared = sum(names[p] == t for p, t in zip(labels.label, truth, strict=True))
    quality = summary["quality"]
    assert quality["count"] == 14
    # The shared samples are scored with the stored pseudo-labels; the 2 new ones add 0-2.
    assert correct_shared <= round(quality["accuracy"] * 14) <= correct_shared + 2


def test_label_text_writes_file_with_gold_quality_report(tmp_path, embed_dir, monkeypatch):
    write_texts(tmp_path / "texts.csv", 30)
    write_texts(tmp_path / "gold.csv", 9, labels=True)
    monkeypatch.chdir(tmp_path)
    summary = run_label(config(tmp_path, embed_dir, out=None, gold=tmp_path / "gold.csv"))
    # The default output path: data name and teacher (its last path component).
    out = tmp_path / "runs" / "labels" / "texts-text-embed-m.parquet"
    assert summary["out"] == "runs/labels/texts-text-embed-m.parquet" and out.is_file()
    labels = read_pseudolabels(out, classes=TOPIC_NAMES.split(","))
    assert labels.ids == [f"t{i:04d}" for i in range(30)]
    quality = labels.metadata["quality"]
    assert quality["count"] == 9 and len(quality["confusion"]) == 3
    assert sum(map(sum, quality["confusion"])) == 9
    assert quality == summary["quality"]
    assert any("teacher on gold labels" in line for line in summary["lines"])
    assert summary["count"] == 30 and sum(summary["label_counts"].values()) == 30
    assert (
        labels.metadata["data"]["fingerprint"]
        and not (tmp_path / "runs" / "labels" / ".texts.parquet.parts").exists()
    )


KILLED_RUN = """
import sys, time
import zmdevice.teachers as teachers
original = teachers.build_teacher

def slow_teacher(*args, **kwargs):
    teacher = original(*args, **kwargs)
    forward = teacher.forward
    def slow(batch):
        time.sleep(0.1)
        return forward(batch)
    teacher.forward = slow
    return teacher

teachers.build_teacher = slow_teacher
import zmdevice.labeling.run
zmdevice.labeling.run.CHUNK_BATCHES = 4
from zmdevice.config import LabelConfig
from zmdevice.labeling.run import run_label
run_label(LabelConfig(data=sys.argv[1], classes=sys.argv[2], teacher=sys.argv[3], out=sys.argv[4],
                      batch_size=2, device="cpu", workers=0))
"""


def test_killed_run_resumes_to_the_same_file(tmp_path, embed_dir, monkeypatch):
    import zmdevice.labeling.run

    monkeypatch.setattr(zmdevice.labeling.run, "CHUNK_BATCHES", 4)  # 8 samples per part
    write_texts(tmp_path / "texts.csv", 80)
    resumed = tmp_path / "resumed.parquet"
    parts = tmp_path / ".resumed.parquet.parts"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tmp_path / "texts.csv"),
            TOPIC_NAMES,
            f"text-embed:{embed_dir}",
            str(resumed),
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list(parts.glob("part-*.parquet"))) < 2 and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()
    done = len(list(parts.glob("part-*.parquet")))
    assert 2 <= done < 10 and not resumed.exists()

    with pytest.raises(UserError, match=r"interrupted run left \d+ finished chunk\(s\).*--resume"):
        run_label(config(tmp_path, embed_dir, out=resumed, batch_size=2))
    with pytest.raises(UserError, match=r"--resume: .*other settings \(classes\)"):
        run_label(
            config(tmp_path, embed_dir, out=resumed, batch_size=2, classes="a,b,c", resume=True)
        )
    summary = run_label(config(tmp_path, embed_dir, out=resumed, batch_size=2, resume=True))
    assert summary["count"] == 80 and not parts.exists()
    run_label(config(tmp_path, embed_dir, out=tmp_path / "whole.parquet", batch_size=2))
    assert_same_content(resumed, tmp_path / "whole.parquet")


def test_shards_combine_into_the_unsharded_file(tmp_path, embed_dir):
    write_texts(tmp_path / "texts.csv", 25)
    for index in range(3):
        summary = run_label(
            config(tmp_path, embed_dir, shard=f"{index}/3", workers=1 if index == 0 else 0)
        )
        assert summary["out"].endswith(f"out.shard-{index}-of-3.parquet")
    assert (
        read_pseudolabel_metadata(tmp_path / "out.shard-1-of-3.parquet")["data"]["shard"] == "1/3"
    )
    combined = run_label(config(tmp_path, embed_dir, combine=True))
    assert combined["count"] == 25
    run_label(config(tmp_path, embed_dir, out=tmp_path / "whole.parquet"))
    ids, label, _, _, meta = content(tmp_path / "out.parquet")
    whole = content(tmp_path / "whole.parquet")
    assert ids == whole[0]
    np.testing.assert_array_equal(label, whole[1])
    np.testing.assert_allclose(
        read_pseudolabels(tmp_path / "out.parquet").dense_probs(),
        read_pseudolabels(tmp_path / "whole.parquet").dense_probs(),
        atol=2e-3,
    )
    assert meta["data"] == whole[4]["data"]
    with pytest.raises(UserError, match="labeled by teacher 'text-embed:.*not 'minilm'"):
        run_label(
            config(
                tmp_path,
                embed_dir,
                combine=True,
                teacher="minilm",
                shard=None,
                out=tmp_path / "out.parquet",
            )
        )
    (tmp_path / "out.shard-2-of-3.parquet").unlink()
    with pytest.raises(
        UserError, match=r"--combine: shard\(s\) 2 of 3 missing .*out.shard-2-of-3.parquet"
    ):
        run_label(config(tmp_path, embed_dir, combine=True))


def test_shard_parsing_and_slices_cover_the_data_once():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    covered = [i for k in range(4) for i in shard_range(10, k, 4)]
    assert covered == list(range(10))
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(UserError, match=f"--shard '{bad}': use I/N"):
            parse_shard(bad)


def test_images_with_a_corrupt_file_are_skipped_and_counted(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "map.toml").write_text('cat = ["tabby"]\ndog = ["beagle"]\n')
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not a png")
    teacher = f"imagenet:test_efficientnet:{tmp_path / 'w.pth'}:map={tmp_path / 'map.toml'}:size=32"
    base = dict(
        data=folder,
        classes="cat,dog",
        teacher=teacher,
        out=tmp_path / "i.parquet",
        batch_size=4,
        device="cpu",
        workers=0,
    )
    with pytest.raises(UserError, match="unreadable image .*9.png.*--skip-corrupt"):
        run_label(LabelConfig(**base))
    summary = run_label(LabelConfig(**base, data_options=DataOptions(skip_corrupt=True)))
    assert summary["count"] == 6 and summary["skipped"] == 1
    assert any("skipped 1 unreadable" in line for line in summary["lines"])
    assert read_pseudolabel_metadata(tmp_path / "i.parquet")["skipped"]["examples"] == ["9.png"]


def test_bad_inputs_are_one_line_errors(tmp_path, embed_dir):
    write_texts(tmp_path / "texts.csv", 4)
    with pytest.raises(UserError, match="class .a. is listed twice in --classes"):
        run_label(config(tmp_path, embed_dir, classes="a,b,a"))
    with pytest.raises(UserError, match=r"1 class\(es\); a classifier needs at least 2"):
        run_label(config(tmp_path, embed_dir, classes="a"))
    with pytest.raises(UserError, match="labels images but .*texts.csv holds texts"):
        run_label(config(tmp_path, embed_dir, teacher="efficientnet-lite0"))
    gold = tmp_path / "gold.csv"
    gold.write_text("text,label\nvote law,politics\nball,cooking\n")
    with pytest.raises(UserError, match="cooking"):
        run_label(config(tmp_path, embed_dir, gold=gold))
    with pytest.raises(UserError, match="unknown --teacher 'nope'"):
        run_label(config(tmp_path, embed_dir, teacher="nope"))


def test_cli_label_prints_summary_and_exits_2_on_bad_input(tmp_path, embed_dir):
    write_texts(tmp_path / "texts.csv", 6)
    runner = CliRunner()
    args = [
        "label",
        str(tmp_path / "texts.csv"),
        "--classes",
        TOPIC_NAMES,
        "--teacher",
        f"text-embed:{embed_dir}",
        "--out",
        str(tmp_path / "c.parquet"),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote " in result.output and "bytes/sample" in result.output
    bad = runner.invoke(app, [*args[:3], "solo", *args[4:]])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


@pytest.mark.slow
def test_real_minilm_labels_wordnet_examples_above_chance(tmp_path):
    with open(ROOT / "examples/default/text/test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:48]
    with open(tmp_path / "gold.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = run_label(
        LabelConfig(
            data=tmp_path / "gold.csv",
            classes=str(ROOT / "examples/default/text/classes.toml"),
            teacher="minilm",
            out=tmp_path / "m.parquet",
            device="cpu",
            workers=0,
            gold=tmp_path / "gold.csv",
        )
    )
    assert summary["quality"]["accuracy"] > 0.4  # chance is 1/8


def test_texts_go_through_the_teacher_shortest_first_and_come_back_in_data_order(
    tmp_path, embed_dir, monkeypatch
):
    import zmdevice.refine
    import zmdevice.teachers as teachers

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(TOPIC_WORDS, size=rng.integers(1, 25))) for _ in range(40)]
    write_table(tmp_path / "texts.csv", [(f"t{i:04d}", t, "") for i, t in enumerate(texts)], False)
    widths, captured, built = [], {}, []
    original_build = teachers.build_teacher

    def recording_teacher(*args, **kwargs):
        teacher = original_build(*args, **kwargs)
        features_and_probs = teacher.features_and_probs

        def recorded(batch):
            widths.append(tuple(batch["input_ids"].shape))
            return features_and_probs(batch)

        teacher.features_and_probs = recorded
        built.append(teacher)
        return teacher

    def capture(features, probs, *rest, **options):
        captured["features"] = features
        return probs, {"prior_weight": 1.0}

    monkeypatch.setattr(teachers, "build_teacher", recording_teacher)
    monkeypatch.setattr(zmdevice.refine, "refine_labels", capture)
    run_label(config(tmp_path, embed_dir, refine=True))
    labels = read_pseudolabels(tmp_path / "out.parquet")
    assert labels.ids == [f"t{i:04d}" for i in range(40)]
    # Batches of similar lengths in the teacher's tokens: each batch is as wide as the
    # longest of its four in the texts sorted by tokens (by characters, some would be wider).
    tokenizer = built[0].collate.tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    by_tokens = sorted(lengths)
    assert [width for _, width in widths] == [max(by_tokens[s : s + 4]) for s in range(0, 40, 4)]
    by_characters = [lengths[i] for i in sorted(range(40), key=lambda i: len(texts[i]))]
    assert sum(4 * max(by_characters[s : s + 4]) for s in range(0, 40, 4)) > sum(
        b * width for b, width in widths
    )  # the texts tell the two orders apart
    in_data_order = sum(4 * max(lengths[s : s + 4]) for s in range(0, 40, 4))
    assert sum(b * width for b, width in widths) < 0.8 * in_data_order
    # Each row holds its own text's probabilities and features.
    with torch.inference_mode():
        pairs = [built[0].features_and_probs(built[0].collate([text])) for text in texts]
    features, probs = zip(*pairs, strict=True)
    # (The file stores compressed probabilities, the parts float16 features.)
    np.testing.assert_allclose(labels.dense_probs(), torch.cat(probs).numpy(), atol=1e-2)
    np.testing.assert_allclose(captured["features"], torch.cat(features).numpy(), atol=2e-3)
    assert len(set(texts)) > 30  # rows that a wrong order would mix up
