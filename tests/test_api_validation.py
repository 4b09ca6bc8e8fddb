"""Every public function checks its arguments first: a wrong type, None, a number out of
range or the wrong container raises ``zmdevice.UserError`` with a one-line message, before
any model is built (the stage functions are replaced by ones that fail the test if
reached). The typed configs hold the CLI and the API to the same rules."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import zmdevice
from zmdevice.cli import app
from zmdevice.config import (
    FIELD_TYPES,
    DataOptions,
    ExportConfig,
    LabelConfig,
    TrainConfig,
    checked_value,
)
from zmdevice.data import open_dataset

LABELED = [("dog cat", "animal"), ("tree flower", "plant")]
TEXTS = ["dog cat", "tree flower", "bird"]
NOT_FINITE = [float("inf"), float("-inf"), float("nan")]


class Reached(Exception):
    """A stage function was called."""


@pytest.fixture(autouse=True)
def no_stage_runs(tmp_path, monkeypatch):
    """In-memory inputs go to this test's cache; reaching a stage's work fails the test."""
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))

    def reached(*args, **kwargs):
        raise Reached("a bad argument reached the stage's work")

    monkeypatch.setattr("zmdevice.training.run.build_setup", reached)
    monkeypatch.setattr("zmdevice.labeling.run.run_label", reached)
    monkeypatch.setattr("zmdevice.exporting.run.run_export", reached)


def raises_one_line(call, *named: str) -> str:
    with pytest.raises(zmdevice.UserError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message, message
    for part in named:
        assert part in message, message
    return message


# ----------------------------------------------------------------------- the configs


def test_every_config_field_has_a_checked_type():
    for cls in (DataOptions, LabelConfig, TrainConfig, ExportConfig):
        for item in dataclasses.fields(cls):
            for kind in str(item.type).split("|"):
                assert kind.strip() == "None" or kind.strip() in FIELD_TYPES, (cls, item.name)


@pytest.mark.parametrize(
    ("annotation", "value", "named"),
    [
        ("int", "5", "'5' (a string)"),
        ("int", 1.5, "an integer"),
        ("int", 2.0, "an integer"),
        ("int", True, "an integer"),
        ("int", None, "got None"),
        ("int", 2**63, "64 bits"),
        ("int", -(2**63) - 1, "64 bits"),
        ("float", "0.1", "a number"),
        ("float", False, "a number"),
        *(("float", value, "finite") for value in NOT_FINITE),
        ("str", 3, "a string"),
        ("str | None", b"cpu", "a string"),
        ("Path", 3, "a path"),
        ("Path | None", ["a.csv"], "a path"),
        ("bool", 1, "true or false"),
        ("bool | None", "yes", "true or false"),
        ("list[str] | None", "a,b", "a list of strings"),
        ("list[str] | None", ["a", 2], "a list of strings"),
        ("DataOptions", {"text_column": "x"}, "a DataOptions"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_refused(annotation, value, named):
    raises_one_line(lambda: checked_value("key", value, annotation), "key must", named)


def test_accepted_values_become_the_fields_type():
    assert checked_value("k", np.int64(3), "int") == 3 and type(checked_value("k", 3, "int")) is int
    assert type(checked_value("k", np.float32(0.5), "float")) is float
    assert checked_value("k", 2, "float") == 2.0
    assert checked_value("k", "a.csv", "Path") == Path("a.csv")
    assert checked_value("k", ("a", "b"), "list[str] | None") == ["a", "b"]
    assert checked_value("k", None, "int | None") is None
    assert checked_value("k", 2**63 - 1, "int") == 2**63 - 1


def test_a_long_or_multi_line_value_is_named_by_its_type():
    frame = pd.DataFrame({"a": range(50)})
    message = raises_one_line(lambda: TrainConfig(labeled="l", unlabeled="u", lr=frame))
    assert message == "lr must be a number, got a DataFrame"


@pytest.mark.parametrize(
    "changes",
    [
        {"lr": "0.1"},
        {"seed": 2**70},
        {"seed": -1},
        {"seed": True},
        {"kd_steps": 1.5},
        {"kd_steps": "5"},
        {"time_budget": float("inf")},
        {"time_budget": "5"},
        {"threshold": float("nan")},
        {"student": 3},
        {"pseudo_labels": 3},
        {"labeled": None},
        {"device": None},
        {"classes": "a,b"},
        {"resume": "yes"},
        {"image_size": 2**64},
    ],
)
def test_train_config_checks_types_before_ranges(changes):
    raises_one_line(lambda: TrainConfig(**{"labeled": "l", "unlabeled": "u", **changes}))


# ----------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"lr": "0.1"}, "lr must be a number, got '0.1' (a string)"),
        ({"pseudo_labels": 3}, "pseudo_labels must be a path"),
        ({"seed": 2**70}, "seed must fit in 64 bits"),
        ({"student": 3}, "student must be a string"),
        ({"kd_steps": 1.5}, "kd_steps must be an integer, got 1.5"),
        ({"kd_steps": "5"}, "kd_steps must be an integer"),
        ({"time_budget": float("inf")}, "time_budget must be a finite number"),
        ({"time_budget": "5"}, "time_budget must be a number"),
        ({"method": None}, "method must be a string"),
        ({"device": 0}, "device must be a string"),
        ({"out": 3}, "out must be a path"),
        ({"test": 3}, "test: expected a path"),
        ({"gold_unlabeled": 3}, "gold_unlabeled: expected a path"),
        ({"progress": "no"}, "progress must be True or False"),
        ({"on_step": 3}, "on_step must be a callable"),
        ({"on_step": [print, 3]}, "on_step must be a callable"),
        ({"labeled": None}, "labeled: expected a path"),
        ({"unlabeled": 3}, "unlabeled: expected a path"),
        ({"labeled": {"dog": "animal"}}, "labeled: expected a path"),
        ({"student": "tiny-cnn"}, "--student tiny-cnn is an image model"),
    ],
)
def test_train_refuses_bad_arguments_before_building_anything(arguments, named):
    values = {"labeled": LABELED, "unlabeled": TEXTS, "method": "supervised", **arguments}
    raises_one_line(lambda: zmdevice.train(**values), named)


# ----------------------------------------------------------------------- label


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"teacher": None}, "teacher must be a string, got None"),
        ({"teacher": 3}, "teacher must be a string"),
        ({"data": None}, "data: expected a path"),
        ({"data": 3.5}, "data: expected a path"),
        ({"classes": None}, "classes: expected"),
        ({"out": 3}, "out must be a path"),
        ({"batch_size": "64"}, "batch_size must be an integer, got '64' (a string)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"gpus_per_worker": float("nan")}, "gpus_per_worker must be a finite number"),
        ({"device": ["cpu"]}, "device must be a string"),
        ({"resume": 1}, "resume must be true or false"),
        ({"text_column": 3}, "text_column must be a string"),
        ({"skip_corrupt": "no"}, "skip_corrupt must be true or false"),
        ({"few_shot": 3}, "few_shot: expected a path"),
        ({"gold": {"a": 1}}, "gold: expected a path"),
        ({"progress": None}, "progress must be True or False"),
    ],
)
def test_label_refuses_bad_arguments_before_labeling(arguments, named):
    values = {"data": TEXTS, "classes": ["animal", "plant"], "teacher": "minilm", **arguments}
    raises_one_line(lambda: zmdevice.label(**values), named)


@pytest.mark.parametrize(
    "few_shot",
    [
        LABELED,
        pd.DataFrame({"text": [text for text, _ in LABELED], "label": ["animal", "plant"]}),
    ],
    ids=["pairs", "dataframe"],
)
def test_few_shot_takes_in_memory_labeled_data_like_gold(monkeypatch, few_shot):
    seen = []

    def run_label(config):
        seen.append(config)
        raise Reached

    monkeypatch.setattr("zmdevice.labeling.run.run_label", run_label)
    with pytest.raises(Reached):
        zmdevice.label(TEXTS, ["animal", "plant"], "minilm", few_shot=few_shot, gold=few_shot)
    (config,) = seen
    for path in (config.few_shot, config.gold):
        examples = open_dataset(path, require_labels=True)
        assert examples.texts == ["dog cat", "tree flower"]
        assert examples.labels == ["animal", "plant"]


# ----------------------------------------------------------------------- suggest, check


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: zmdevice.suggest(None, "p.parquet"), "data: expected a path"),
        (lambda: zmdevice.suggest(TEXTS, 3), "pseudo_labels must be a path"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", n="5"), "n must be an integer"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", n=0), "n must be >= 1"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", seed=2**70), "seed must fit in 64 bits"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", exclude=3), "exclude must be a list"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", labeled=3), "labeled: expected a path"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", out=3), "out must be a path"),
        (lambda: zmdevice.suggest(TEXTS, "p.parquet", colour=1), "unknown option(s) colour"),
        (lambda: zmdevice.check(None, TEXTS, "p.parquet"), "labeled: expected a path"),
        (lambda: zmdevice.check(LABELED, None, "p.parquet"), "data: expected a path"),
        (lambda: zmdevice.check(LABELED, TEXTS, 3), "pseudo_labels must be a path"),
        (lambda: zmdevice.check(LABELED, TEXTS, "p.parquet", folds="3"), "folds must be an int"),
        (lambda: zmdevice.check(LABELED, TEXTS, "p.parquet", colour=1), "unknown option(s)"),
    ],
)
def test_suggest_and_check_refuse_bad_arguments_before_ranking(monkeypatch, call, named):
    def reached(config):
        raise Reached("a bad argument reached the ranking")

    monkeypatch.setattr("zmdevice.curation.suggest.run_suggest", reached)
    monkeypatch.setattr("zmdevice.curation.check.run_check", reached)
    raises_one_line(call, named)


# ----------------------------------------------------------------------- the estimator


@pytest.mark.parametrize(
    ("parameters", "fit", "named"),
    [
        ({"train_options": 3}, {}, "train_options must be a dict of zmdevice.train keywords"),
        ({"train_options": "lr=0.1"}, {}, "train_options must be a dict"),
        ({"train_options": [("lr", 0.1)]}, {}, "train_options must be a dict"),
        ({"train_options": {1: 2}}, {}, "keys must be keyword names"),
        ({"train_options": {"lr": "0.1"}}, {}, "lr must be a number, got '0.1'"),
        ({"train_options": {"seed": 1}}, {}, "set by the estimator's own parameters"),
        ({"kd_steps": 1.5}, {}, "kd_steps must be an integer"),
        ({"seed": "1"}, {}, "seed must be an integer"),
        ({"teacher": 3}, {}, "teacher must be a string"),
        ({"out": 3}, {}, "out: expected a folder path or None, got 3"),
        ({"progress": "no"}, {}, "progress must be True or False"),
        ({}, {"X": 3}, "X: pass a list of texts"),
        ({}, {"X": "dog cat"}, "got a single one"),
        ({}, {"X": [3, 4]}, "items must be texts"),
        ({}, {"y": None}, "y: expected one label per item of X"),
        ({}, {"y": [["animal"], ["plant"]]}, "got shape (2, 1)"),
        ({}, {"y": ["animal", "animal"]}, "at least two classes"),
        ({}, {"X_unlabeled": 3}, "X_unlabeled: pass a list"),
    ],
)
def test_the_estimator_refuses_bad_parameters_and_data_before_training(parameters, fit, named):
    pytest.importorskip("sklearn")
    from zmdevice.sklearn import ZeroMatchClassifier

    data = {"X": ["dog cat", "tree flower"], "y": ["animal", "plant"], **fit}
    estimator = ZeroMatchClassifier(method="supervised", **parameters)
    raises_one_line(lambda: estimator.fit(**data), named)


def test_the_unfitted_estimator_refuses_to_predict():
    pytest.importorskip("sklearn")
    from zmdevice.sklearn import ZeroMatchClassifier

    raises_one_line(lambda: ZeroMatchClassifier().predict(["dog"]), "not fitted yet")
    raises_one_line(lambda: ZeroMatchClassifier().predict_proba("dog"), "not fitted yet")


# ----------------------------------------------------------------------- export, load


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"model_or_dir": None}, "model_or_dir: expected"),
        ({"model_or_dir": 3}, "got 3"),
        ({"model_or_dir": ["models/m"]}, "model_or_dir: expected"),
        ({"out": 3}, "out must be a path"),
        ({"quantize": 8}, "quantize must be a string"),
        ({"opset": 18.0}, "opset must be an integer"),
        ({"opset": "18"}, "opset must be an integer"),
        ({"opset": True}, "opset must be an integer"),
        ({"format": None}, "format must be a string"),
        ({"test": 3}, "test: expected a path"),
        ({"colour": "red"}, "unknown option(s) colour"),
    ],
)
def test_export_refuses_bad_arguments_before_exporting(arguments, named):
    values = {"model_or_dir": "models/m", **arguments}
    raises_one_line(lambda: zmdevice.export(**values), named)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"path": None}, "path: expected"),
        ({"path": 3}, "got 3"),
        ({"path": ["a.onnx"]}, "got ['a.onnx']"),
        ({"path": {"path": "a.onnx"}}, "path: expected"),
        ({"path": "a.onnx", "device": 3}, "device must be a string"),
        ({"path": "a.onnx", "device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_load_refuses_bad_arguments(arguments, named):
    raises_one_line(lambda: zmdevice.load(**arguments), named)


# ----------------------------------------------------------------------- classifiers


def tiny_onnx(folder: Path, modality: str) -> Path:
    """A hand-made exported model: an image one scores each colour channel's mean (classes
    red, green, blue); a text one scores its texts' token count and id sum."""
    import onnx
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [None, 3, 4, 4])]
        axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
        nodes = [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["logits"], keepdims=0)]
        classes, preprocess = ["red", "green", "blue"], {"image_size": 4, "mean": [0] * 3}
        preprocess["std"] = [1, 1, 1]
    else:
        inputs = [
            helper.make_tensor_value_info(name, TensorProto.INT64, [None, None])
            for name in ("input_ids", "attention_mask")
        ]
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
        nodes = [
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mask", "axes"], ["count"], keepdims=1),
            helper.make_node("ReduceSum", ["ids", "axes"], ["total"], keepdims=1),
            helper.make_node("Concat", ["count", "total"], ["logits"], axis=1),
        ]
        classes = ["short", "long"]
        preprocess = {"max_length": 8, "tokenizer": "tiny.tokenizer.json", "pad_token_id": 0}
        vocab = {"[PAD]": 0, "[UNK]": 1, "dog": 2, "tree": 3}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(folder / "tiny.tokenizer.json"))
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph(nodes, "tiny", inputs, [output], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    metadata = {
        "zmdevice.classes": json.dumps(classes),
        "zmdevice.preprocess": json.dumps(preprocess),
        "zmdevice.modality": modality,
    }
    onnx.helper.set_model_props(model, metadata)
    path = folder / f"tiny-{modality}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-onnx")
    return {modality: zmdevice.load(tiny_onnx(folder, modality)) for modality in ("image", "text")}


def test_the_hand_made_classifiers_classify_lists(classifiers):
    text = classifiers["text"]
    assert text.predict(["dog", "dog tree dog"]) == ["long", "long"]  # id sums beat counts
    probabilities = text.predict_proba(("dog", "tree"))
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1)
    image = Image.fromarray(np.full((4, 4, 3), (0, 255, 0), dtype=np.uint8))
    assert classifiers["image"].predict([image]) == ["green"]


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
@pytest.mark.parametrize(
    ("modality", "items", "named"),
    [
        ("text", "one text", "pass a list of texts (one item: [item]), got a single str"),
        ("text", {"text": "one text"}, "got a single dict"),
        ("text", b"bytes", "got a single bytes"),
        ("text", 3, "pass a list of texts, got 3"),
        ("text", None, "got None"),
        ("text", [3], "a text model classifies texts, got int"),
        ("text", pd.DataFrame({"sentence": ["x"]}), "no 'text' column"),
        ("image", Path("one.png"), "got a single PosixPath"),
        ("image", "one.png", "got a single str"),
        ("image", Image.new("RGB", (4, 4)), "got a single Image"),
        ("image", [None], "got NoneType"),
    ],
)
def test_a_single_item_or_a_wrong_container_is_refused(classifiers, method, modality, items, named):
    raises_one_line(lambda: getattr(classifiers[modality], method)(items), named)


def test_logits_refuse_one_bare_text(classifiers):
    raises_one_line(lambda: classifiers["text"].logits("one text"), "pass a list of texts")
    assert classifiers["text"].logits(["one text"]).shape == (1, 2)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, "4", True, None, 2**64])
def test_predict_proba_checks_its_batch_size(classifiers, batch_size):
    raises_one_line(lambda: classifiers["text"].predict_proba(["dog"], batch_size), "batch_size")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"colour": "red"}, "unknown option(s) colour"),
        ({"text_column": 3}, "text_column must be a string"),
        ({"label_column": None}, "label_column must be a string"),
    ],
)
def test_classifier_evaluate_checks_its_options(classifiers, options, named):
    raises_one_line(lambda: classifiers["text"].evaluate(TEXTS, **options), named)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"path": None}, "model path: expected"),
        ({"path": 3}, "model path: expected"),
        ({"device": 3}, "device must be a string"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"threads": "2"}, "threads must be an integer"),
    ],
)
def test_classifier_constructor_checks_its_arguments(classifiers, arguments, named):
    values = {"path": classifiers["image"].path, **arguments}
    path = values.pop("path")
    raises_one_line(lambda: zmdevice.Classifier(path, **values), named)


def fake_student_folder(folder: Path) -> Path:
    """A folder that reads as a trained text student, without weights: enough to show that
    items are checked before the model is loaded."""
    from zmdevice.students import FORMAT, FORMAT_VERSION
    from zmdevice.students.base import CONFIG_FILE

    folder.mkdir(parents=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "modality": "text"}
    config.update(classes=["a", "b"], architecture={}, preprocess={})
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda s: s.predict("one text"), "pass a list of texts"),
        (lambda s: s.predict_proba({"text": "x"}), "got a single dict"),
        (lambda s: s.predict_proba(["x"], batch_size=0), "batch_size must be >= 1"),
        (lambda s: s.evaluate(TEXTS, colour="red"), "unknown option(s) colour"),
        (lambda s: s.evaluate(TEXTS, batch_size="8"), "batch_size must be an integer"),
        (lambda s: s.export(out=3), "out must be a path"),
    ],
)
def test_trained_student_methods_check_before_loading_the_model(tmp_path, call, named):
    student = zmdevice.load(fake_student_folder(tmp_path / "student"))
    assert isinstance(student, zmdevice.TrainedStudent)
    raises_one_line(lambda: call(student), named)
    assert student._model is None


@pytest.mark.parametrize(
    ("arguments", "named"), [({"out": None}, "out: expected"), ({"device": 3}, "device must be")]
)
def test_trained_student_constructor_checks_its_arguments(tmp_path, arguments, named):
    raises_one_line(lambda: zmdevice.TrainedStudent(**{"out": tmp_path, **arguments}), named)


# ----------------------------------------------------------------------- the CLI, same rules


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--time-budget", "inf"], "--time-budget: time_budget must be a finite number"),
        (["--seed", str(2**70)], "--seed: seed must fit in 64 bits"),
    ],
)
def test_the_cli_refuses_the_same_values_in_one_line(flags, named):
    result = CliRunner().invoke(app, ["train", "--labeled", "l.csv", "--unlabeled", "u", *flags])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message and named in message


def test_a_config_file_with_inf_names_the_file(tmp_path):
    settings = tmp_path / "train.toml"
    settings.write_text('labeled = "l.csv"\nunlabeled = "u.csv"\nlr = inf\n')
    result = CliRunner().invoke(app, ["train", "--config", str(settings)])
    assert result.exit_code == 2
    assert f"config file {settings}: lr must be a finite number, got inf" in result.output
