"""The Node.js sample (export/node) agrees with `zmdevice predict`: command line and HTTP.

It shares export/web/preprocess.mjs with the browser page; here that module is also run
on tests/fixtures/preprocess.json under Node and must reproduce the Python runtime.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import exported_models
import numpy as np
import preprocess_fixture
import pytest
from PIL import Image

from zmdevice.runtime import OnnxClassifier, load_image

NODE_SAMPLE = Path(__file__).resolve().parent.parent / "export" / "node"


REASON = preprocess_fixture.missing_npm_packages(
    NODE_SAMPLE, ("onnxruntime-node", "@huggingface/tokenizers", "pngjs", "jpeg-js")
)
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


def node(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["node", *args], capture_output=True, text=True, timeout=timeout, cwd=NODE_SAMPLE
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_like_predict(model_path: Path, inputs: list[str], predictions: list[dict]) -> float:
    """Node's probabilities equal `zmdevice predict`'s to 1e-5, its logits to 1e-5 of
    their scale; returns the largest probability difference."""
    classifier = OnnxClassifier(model_path)
    expected = exported_models.predict_json(model_path, inputs, len(classifier.classes))
    if classifier.modality == "text":
        logits = classifier.logits(inputs)
    else:
        logits = classifier.logits([load_image(Path(p)) for p in inputs])
    largest = 0.0
    for got, want, row in zip(predictions, expected["predictions"], logits, strict=True):
        probabilities = dict(zip(classifier.classes, got["probabilities"], strict=True))
        for top in want["top"]:
            largest = max(largest, abs(probabilities[top["class"]] - top["probability"]))
        assert got["top"][0]["class"] == want["top"][0]["class"], want["input"]
        scale = float(np.abs(row).max())
        np.testing.assert_allclose(got["logits"], row, rtol=0, atol=1e-5 * scale)
    assert largest <= 1e-5
    return largest


def image_inputs(models, folder: Path) -> list[str]:
    """Test PNGs of each class plus grey, RGBA (half transparent) and odd-size ones."""
    files = sorted(Path(models["image_test"]).rglob("*.png"))
    chosen = [next(p for p in files if p.parent.name == c) for c in exported_models.IMAGE_CLASSES]
    rng = np.random.default_rng(5)
    exported_models.colour_image(1, rng, 37).convert("L").save(folder / "grey.png")
    rgba = exported_models.colour_image(2, rng, 16).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)))
    rgba.save(folder / "rgba.png")
    exported_models.colour_image(0, rng, 16).resize((61, 9)).save(folder / "odd.png")
    return [str(p) for p in chosen] + [str(folder / n) for n in ("grey.png", "rgba.png", "odd.png")]


def test_node_preprocessing_matches_the_shared_fixture():
    result = json.loads(
        node("fixture.mjs", str(preprocess_fixture.FIXTURE), str(preprocess_fixture.TOKENIZER))
    )
    recorded = json.loads(preprocess_fixture.FIXTURE.read_text(encoding="utf-8"))
    assert preprocess_fixture.assert_matches(result, recorded) == len(recorded["texts"])


@pytest.mark.parametrize("file", ["text_onnx", "text_int8", "image_onnx", "image_int8"])
def test_node_cli_equals_zmdevice_predict(models, tmp_path, file):
    model_path = exported_models.model_file(models, file)
    if file.startswith("text"):
        inputs = ["a small dog with a cat", "the red flower of a tree"]
        # not "" (`zmdevice predict` reads it as a folder) nor NUL (no such argv string)
        inputs += [text for _, text in preprocess_fixture.TEXTS if text and "\x00" not in text]
    else:
        inputs = image_inputs(models, tmp_path)
    summary = json.loads(node("classify.mjs", str(model_path), *inputs, "--top-k", "2", "--json"))
    assert summary["modality"] == ("text" if file.startswith("text") else "image")
    assert [p["input"] for p in summary["predictions"]] == inputs
    assert all(len(p["top"]) == 2 for p in summary["predictions"])
    gap = assert_like_predict(model_path, inputs, summary["predictions"])
    print(f"node {file}: max |prob diff| {gap:.1e} over {len(inputs)} inputs")


def test_node_cli_fails_with_one_line_for_an_unreadable_image(models, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    done = subprocess.run(
        ["node", "classify.mjs", str(models["image_onnx"]), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_SAMPLE,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: cannot read image {bad}")


def post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture()
def server(models):
    """Start serve.mjs for a model on a free port; yields a function model -> base URL."""
    started = []

    def start(model_path: Path) -> str:
        process = subprocess.Popen(
            ["node", "serve.mjs", str(model_path), "--port", "0", "--top-k", "2"],
            cwd=NODE_SAMPLE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        line = process.stdout.readline()
        assert line.startswith("listening on http://"), process.stderr.read()[-2000:]
        return line.split()[-1]

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def test_node_http_endpoint_equals_zmdevice_predict(models, tmp_path, server):
    text_url = server(models["text_onnx"])
    with urllib.request.urlopen(text_url + "/", timeout=30) as response:
        assert json.loads(response.read())["classes"] == exported_models.TEXT_CLASSES
    texts = ["a small dog with a cat", "the red flower of a tree", "Héllo 🐶 中文"]
    reply = post(text_url + "/classify", json.dumps({"texts": texts}).encode(), "application/json")
    assert_like_predict(models["text_onnx"], texts, reply["predictions"])

    image_url = server(models["image_onnx"])
    images = image_inputs(models, tmp_path)
    predictions = [
        post(image_url + "/classify", Path(p).read_bytes(), "image/png")["predictions"][0]
        for p in images
    ]
    assert_like_predict(models["image_onnx"], images, predictions)
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(image_url + "/classify", b"not an image", "image/png")
    assert refused.value.code == 400
