"""The onnxruntime side: preprocessing twins, predict/evaluate, errors, and no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import exported_models
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.errors import UserError
from zmdevice.runtime import OnnxClassifier, preprocess_image, run_evaluate_onnx, run_predict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


# ----------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("mode", "size"), [("RGB", (16, 16)), ("RGB", (37, 23)), ("L", (28, 28)), ("RGBA", (9, 40))]
)
def test_preprocess_image_is_bit_identical_to_the_training_clean_transform(mode, size):
    from zmdevice.augment import image_transforms
    from zmdevice.images import to_rgb

    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    preprocess = {"image_size": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    clean = image_transforms(16, preprocess["mean"], preprocess["std"])["clean"]
    # Training reads images through data.load_image, which applies to_rgb first.
    expected = clean(to_rgb(image)).numpy()
    got = preprocess_image(image, preprocess)
    assert got.dtype == np.float32 and got.shape == (3, 16, 16)
    np.testing.assert_array_equal(got, expected)


def test_runtime_tokenisation_equals_the_students(models):
    from zmdevice.students import load_student

    student = load_student(models["text_dir"])
    classifier = OnnxClassifier(models["text_onnx"])
    long_text = " ".join(["dog"] * 100)  # beyond max_length: truncated the same way
    texts = ["a dog", "the small red tree of a fish", long_text, "Flower!"]
    ids, mask = student.encode_texts(texts)
    feed = classifier.encode_texts(texts)
    np.testing.assert_array_equal(feed["input_ids"], ids.numpy())
    np.testing.assert_array_equal(feed["attention_mask"], mask.numpy())
    assert feed["input_ids"].shape[1] == student.max_length


def test_predict_proba_matches_pytorch_and_sums_to_one(models):
    import torch

    from zmdevice.students import load_student

    classifier = OnnxClassifier(models["image_onnx"])
    student = load_student(models["image_dir"])
    images = [Image.open(p) for p in sorted(Path(models["image_test"]).rglob("*.png"))[:7]]
    probs = classifier.predict_proba(images)
    with torch.no_grad():
        pixels = torch.from_numpy(classifier.encode_images(images)["pixel_values"])
        expected = torch.softmax(student(pixel_values=pixels), dim=1).numpy()
    assert probs.shape == (7, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


# ----------------------------------------------------------------------- predict / evaluate


def test_predict_image_folder_ranks_classes_and_is_right_on_easy_images(models):
    summary = run_predict(models["image_onnx"], [str(models["image_test"])], top_k=2)
    predictions = summary["predictions"]
    assert len(predictions) == 15
    for item in predictions:
        first, second = item["top"]
        assert first["probability"] >= second["probability"]
        # the folder name is the true class; the tiny student learned the colours
        assert first["class"] == Path(item["input"]).parent.name
    assert summary["lines"][-1].startswith("15 image input(s)")


def test_predict_text_strings_and_table(models):
    summary = run_predict(models["text_onnx"], ["a dog and a cat", "tree flower fruit"])
    assert [p["top"][0]["class"] for p in summary["predictions"]] == ["animal", "plant"]
    table = run_predict(models["text_onnx"], [str(models["text_test"])], top_k=2)
    assert len(table["predictions"]) == 20
    assert all(len(p["top"]) == 2 for p in table["predictions"])


def test_evaluate_onnx_reports_accuracy_that_matches_predictions(models):
    report = run_evaluate_onnx(models["image_onnx"], models["image_test"], device="cpu")
    predicted = run_predict(models["image_onnx"], [str(models["image_test"])])["predictions"]
    correct = np.mean([p["top"][0]["class"] == Path(p["input"]).parent.name for p in predicted])
    assert report["accuracy"] == pytest.approx(correct)
    assert report["count"] == 15
    assert np.asarray(report["confusion"]).sum() == 15
    assert set(report["per_class"]) == set(exported_models.IMAGE_CLASSES)
    text = run_evaluate_onnx(models["text_onnx"], models["text_test"])
    assert text["count"] == 20 and text["accuracy"] >= 0.8


def test_evaluate_unknown_label_names_the_sample(models, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("text,label\na dog,animal\na tree,mineral\n")
    with pytest.raises(UserError, match=r"unknown label 'mineral' at row 2 .*classes of the model"):
        run_evaluate_onnx(models["text_onnx"], table)


def test_cli_predict_json_and_exit_codes(models):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(models["text_onnx"]), "a cat", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["predictions"][0]["top"][0]["class"] == "animal"
    bad = runner.invoke(app, ["predict", str(models["image_onnx"]), "a cat"])
    assert bad.exit_code == 2
    assert "image classifier" in bad.output and "Traceback" not in bad.output


# ----------------------------------------------------------------------- errors


def test_corrupt_onnx_file_is_a_user_error_naming_it(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    with pytest.raises(UserError, match=r"broken\.onnx is not a readable ONNX model"):
        OnnxClassifier(broken)
    with pytest.raises(UserError, match="model file not found"):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_onnx_without_zmdevice_metadata_is_refused(models, tmp_path):
    import onnx

    model = onnx.load(str(models["image_onnx"]))
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    with pytest.raises(UserError, match="no 'zmdevice.classes' metadata"):
        OnnxClassifier(plain)


def test_text_to_image_model_and_image_to_text_model_are_user_errors(models):
    with pytest.raises(UserError, match="is not an image file or folder.*image classifier"):
        run_predict(models["image_onnx"], ["a photo of a dog"])
    image = next(Path(models["image_test"]).rglob("*.png"))
    with pytest.raises(UserError, match="text classifier"):
        run_predict(models["text_onnx"], [str(image)])
    with pytest.raises(UserError, match="text classifier"):
        run_predict(models["text_onnx"], [str(models["image_test"])])
    with pytest.raises(UserError, match="not a CSV/JSONL/Parquet table"):
        run_predict(models["text_onnx"], [str(models["text_onnx"])])
    with pytest.raises(UserError, match="table not found: missing/reviews.csv"):
        run_predict(models["text_onnx"], ["missing/reviews.csv"])


def test_missing_tokenizer_file_names_the_expected_path(models, tmp_path):
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(Path(models["text_onnx"]).read_bytes())
    expected = tmp_path / "tiny-txt.tokenizer.json"  # the name written in the metadata
    with pytest.raises(UserError, match="tokenizer file missing") as error:
        OnnxClassifier(lonely)
    assert str(expected) in str(error.value)


def with_tokenizer_name(models, folder: Path, name: str) -> Path:
    """A copy of the tiny text model in ``folder`` whose metadata names tokenizer ``name``,
    with the real tokenizer file beside it under its usual name."""
    import onnx

    model = onnx.load(str(models["text_onnx"]))
    for prop in model.metadata_props:
        if prop.key == "zmdevice.preprocess":
            preprocess = json.loads(prop.value)
            original = Path(models["text_onnx"]).parent / preprocess["tokenizer"]
            prop.value = json.dumps({**preprocess, "tokenizer": name})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(original.read_bytes())
    onnx.save(model, str(folder / "crafted.onnx"))
    return folder / "crafted.onnx"


@pytest.mark.parametrize(
    "name",
    [
        "../../../../etc/passwd",
        "/etc/passwd",
        "../outside/tokenizer.json",  # a valid tokenizer, but outside the model's folder
        "sub/tokenizer.json",
        "sub\\tokenizer.json",
        "..",
        "linked.json",  # a link in the folder to a tokenizer elsewhere
    ],
)
def test_a_tokenizer_name_outside_the_models_folder_is_refused_unopened(models, tmp_path, name):
    model = with_tokenizer_name(models, tmp_path / "model", name)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_bytes((model.parent / "tokenizer.json").read_bytes())
    (model.parent / "sub").mkdir()
    (model.parent / "sub" / "tokenizer.json").write_bytes((outside / "tokenizer.json").read_bytes())
    (model.parent / "linked.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(UserError, match="not a file name in the model's folder") as error:
        OnnxClassifier(model)
    assert "\n" not in str(error.value) and str(model) in str(error.value)


def test_a_plain_tokenizer_name_in_the_models_folder_is_loaded(models, tmp_path):
    model = with_tokenizer_name(models, tmp_path / "model", "tokenizer.json")
    classifier = OnnxClassifier(model)
    assert classifier.tokenizer_path() == model.parent / "tokenizer.json"
    expected = OnnxClassifier(models["text_onnx"]).predict_proba(["a dog", "a tree"])
    assert np.allclose(classifier.predict_proba(["a dog", "a tree"]), expected)


def test_corrupt_image_input_names_the_file(models, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*bad\.png"):
        run_predict(models["image_onnx"], [str(bad)])


# ----------------------------------------------------------------------- without torch

BLOCK_TORCH = """
import importlib.abc, sys
BLOCKED = ("torch", "torchvision", "transformers", "open_clip", "timm", "onnx")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
for name in BLOCKED:
    sys.modules[name] = None
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, env=env
    )


def test_predict_and_evaluate_work_with_torch_blocked(models):
    code = f"""
import json
from typer.testing import CliRunner
from zmdevice.cli import app
runner = CliRunner()
out = {{}}
for args in (
    ["predict", {str(models["image_onnx"])!r}, {str(models["image_test"])!r}, "--json"],
    ["predict", {str(models["text_onnx"])!r}, "a dog", {str(models["text_test"])!r}, "--json"],
    ["evaluate", {str(models["image_onnx"])!r}, "--data", {str(models["image_test"])!r}, "--json"],
    ["evaluate", {str(models["text_onnx"])!r}, "--data", {str(models["text_test"])!r}, "--json"],
):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    out[" ".join(args[:2])] = json.loads(result.output)
heavy = [m for m in ("torch", "transformers", "onnx") if sys.modules.get(m) is not None]
print(json.dumps({{"heavy": heavy, "counts": [len(v.get("predictions", [])) or v["count"]
                                             for v in out.values()]}}))
"""
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["counts"] == [15, 21, 15, 20]


def test_the_block_really_blocks_torch():
    result = run_without_torch("import torch")
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


# ----------------------------------------------------------------------- export/app.py


def test_python_app_sample_classifies_without_torch(models, tmp_path):
    """export/app.py imports its preprocessing from the torch-free zmdevice.runtime."""
    app_file = REPO / "export" / "app.py"
    image = sorted(Path(models["image_test"]).rglob("*.png"))[0]
    for model, item in ((models["image_onnx"], str(image)), (models["text_onnx"], "a small cat")):
        code = BLOCK_TORCH + (
            f"sys.argv = ['app.py', {str(model)!r}, {item!r}]\n"
            f"exec(compile(open({str(app_file)!r}).read(), 'app.py', 'exec'))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-2000:]
        expected = run_predict(model, [item])["predictions"][0]["top"][0]
        name, probability = result.stdout.split()[:2]
        assert name == expected["class"]
        assert float(probability) == pytest.approx(expected["probability"], abs=1e-6)
