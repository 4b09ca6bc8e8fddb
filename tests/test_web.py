"""The browser sample (export/web) in headless Chromium agrees with `zmdevice predict`.

Images and texts, fp32 and int8 files: the page's probabilities equal the Python
runtime's to 1e-5 (logits to 1e-5 of their scale), its token ids equal the Python
tokenizer's, and its preprocessing module reproduces tests/fixtures/preprocess.json.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import exported_models
import numpy as np
import preprocess_fixture
import pytest
from PIL import Image

from zmdevice.runtime import OnnxClassifier, load_image

WEB = Path(__file__).resolve().parent.parent / "export" / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def missing_requirements() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return "Chromium not installed (Debian: apt-get install chromium)"
    packages = ("onnxruntime-web", "playwright-core", "@huggingface/tokenizers")
    return preprocess_fixture.missing_npm_packages(WEB, packages)


REASON = missing_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return exported_models.build(tmp_path_factory.getbasetemp() / "exported-models")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def site(tmp_path):
    """A static server over a folder holding the page (as web/), models and images."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "web").symlink_to(WEB, target_is_directory=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield root, f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def open_pages(urls: list[str]) -> list[dict]:
    """Each page's final ``window.zmdevice`` state, from one headless Chromium."""
    result = subprocess.run(
        ["node", str(WEB / "drive.mjs"), *urls],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, CHROMIUM=CHROMIUM),
    )
    states = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(states) == len(urls), result.stderr[-3000:]
    return states


@pytest.mark.parametrize("file", ["image_onnx", "image_int8"])
def test_page_image_prediction_equals_zmdevice_predict(models, site, file):
    root, base = site
    model_path = exported_models.model_file(models, file)
    shutil.copy(model_path, root / "model.onnx")
    files = sorted(Path(models["image_test"]).rglob("*.png"))
    # One S x S image per class, one larger test image, and two odd sizes: the page's
    # PIL-exact bilinear resize must reproduce the Python runtime's pixels for all.
    chosen = [next(p for p in files if p.parent.name == c) for c in exported_models.IMAGE_CLASSES]
    chosen.append(next(p for p in files if Image.open(p).size != (16, 16)))
    rng = np.random.default_rng(3)
    for index, size in ((2, (61, 37)), (1, (9, 12))):
        odd = root / f"odd-{size[0]}x{size[1]}.png"
        exported_models.colour_image(index, rng, 16).resize(size, Image.NEAREST).save(odd)
        chosen.append(odd)
    grey = root / "grey.png"
    exported_models.colour_image(0, rng, 20).convert("L").save(grey)
    chosen.append(grey)
    names = []
    for i, image in enumerate(chosen):
        names.append(f"input-{i}.png")
        shutil.copy(image, root / names[-1])
    states = open_pages([f"{base}/web/index.html?model=../model.onnx&image=../{n}" for n in names])
    expected = exported_models.predict_json(model_path, [str(p) for p in chosen], 3)
    # Logits too: a trained model's probabilities saturate and hide small pixel differences.
    classifier = OnnxClassifier(model_path)
    pictures = [load_image(p) for p in chosen]
    logits = classifier.logits(pictures)
    reference = int8_reference(file, model_path, models)
    prob_gaps = []
    for state, want in zip(states, expected["predictions"], strict=True):
        assert state["status"] == "done", state
        assert state["model"]["modality"] == "image"
        assert state["result"]["class"] == want["top"][0]["class"], want["input"]
        page = dict(zip(state["result"]["classes"], state["result"]["probabilities"], strict=True))
        for top in want["top"]:
            prob_gaps.append(abs(page[top["class"]] - top["probability"]))
    page_logits = [state["result"]["logits"] for state in states]
    fp32_logits = reference.logits(pictures) if reference else None
    assert_parity(file, page_logits, logits, fp32_logits, prob_gaps)
    # images of three different classes: the page is not stuck on one answer
    assert len({state["result"]["class"] for state in states}) == 3


def int8_reference(file: str, model_path: Path, models) -> OnnxClassifier | None:
    """For an int8 file, the fp32 model that the page's int8 logits are held against.

    onnxruntime's int8 kernels round differently on x86 (the Python runtime here) and in
    WASM: on x86 CPUs with AVX2 but no VNNI the u8 x s8 products can saturate, and the
    Python int8 logits drift from fp32 (on the tests' text student by up to 1.3x the logit
    scale: a low-confidence text flips), while WASM's stay close to fp32. So the
    page's int8 logits must agree with fp32's to the quantisation error; its token ids
    and pixels still equal Python's exactly.
    """
    if not file.endswith("int8"):
        return None
    return OnnxClassifier(exported_models.model_file(models, file.replace("int8", "onnx")))


def assert_parity(file: str, page_logits, python_logits, fp32_logits, prob_gaps, note=""):
    """fp32 files: probabilities equal Python's to 1e-5, logits to 1e-5 of their scale.
    int8 files: logits within 15% of the fp32 logit scale of the fp32 logits."""
    page, python = np.asarray(page_logits), np.asarray(python_logits)
    scale = float(np.abs(python).max(axis=1).min())  # the strictest row's scale
    row_gaps = np.abs(page - python).max(axis=1) / np.abs(python).max(axis=1)
    print(
        f"browser {file}: {note}max |prob diff| vs zmdevice predict {max(prob_gaps):.1e}, "
        f"max logit diff / logit scale {row_gaps.max():.1e}"
    )
    if fp32_logits is None:
        assert max(prob_gaps) <= 1e-5, prob_gaps
        assert row_gaps.max() <= 1e-5, (row_gaps, scale)
    else:
        fp32 = np.asarray(fp32_logits)
        drift = np.abs(page - fp32).max() / np.abs(fp32).max()
        python_drift = np.abs(python - fp32).max() / np.abs(fp32).max()
        print(
            f"  int8 logits vs fp32, over the fp32 logit scale: page {drift:.1e}, "
            f"Python {python_drift:.1e}"
        )
        assert drift <= 0.15, drift


def tricky_texts() -> list[str]:
    """The fixture's tricky texts (accents, emoji, CJK, long, empty after normalisation)
    plus plain ones. Not "": `zmdevice predict ""` reads it as the current folder."""
    plain = ["a small dog with a cat", "the red flower of a tree", "Bread and FRUIT!"]
    return plain + [text for _, text in preprocess_fixture.TEXTS if text]


@pytest.mark.parametrize("file", ["text_onnx", "text_int8"])
def test_page_text_prediction_equals_zmdevice_predict(models, site, file):
    root, base = site
    model_path = exported_models.model_file(models, file)
    shutil.copy(model_path, root / "text.onnx")
    # the page fetches the tokenizer named in the metadata from beside the model
    tokenizer_name = OnnxClassifier(model_path).tokenizer_path().name
    shutil.copy(Path(model_path).parent / tokenizer_name, root / tokenizer_name)
    texts = tricky_texts()
    query = "&".join(f"text={quote(text)}" for text in texts)
    (state,) = open_pages([f"{base}/web/index.html?model=../text.onnx&{query}"])
    assert state["status"] == "done", state
    assert state["model"] == {
        "name": "text.onnx",
        "modality": "text",
        "classes": exported_models.TEXT_CLASSES,
    }
    classifier = OnnxClassifier(model_path)
    expected = exported_models.predict_json(model_path, texts, len(classifier.classes))
    assert len(state["results"]) == len(texts)
    reference = int8_reference(file, model_path, models)
    prob_gaps, python_logits, fp32_logits, same_ids = [], [], [], 0
    for text, page, want in zip(texts, state["results"], expected["predictions"], strict=True):
        feed = classifier.encode_texts([text])
        assert page["ids"] == feed["input_ids"][0].tolist(), text
        same_ids += 1
        probabilities = dict(zip(page["classes"], page["probabilities"], strict=True))
        for top in want["top"]:
            prob_gaps.append(abs(probabilities[top["class"]] - top["probability"]))
        python_logits.append(classifier.logits(feed)[0])
        if reference:
            fp32_logits.append(reference.logits(feed)[0])
    page_logits = [page["logits"] for page in state["results"]]
    note = f"token ids equal {same_ids}/{len(texts)}, "
    assert_parity(file, page_logits, python_logits, fp32_logits or None, prob_gaps, note)
    # a trained model: both classes occur among the answers
    assert {page["class"] for page in state["results"]} == set(exported_models.TEXT_CLASSES)


def test_page_preprocessing_matches_the_shared_fixture(site):
    root, base = site
    shutil.copy(preprocess_fixture.FIXTURE, root / "fixture.json")
    shutil.copy(preprocess_fixture.TOKENIZER, root / "tokenizer.json")
    (state,) = open_pages(
        [f"{base}/web/index.html?fixture=../fixture.json&tokenizer=../tokenizer.json"]
    )
    assert state["status"] == "done", state
    recorded = json.loads(preprocess_fixture.FIXTURE.read_text(encoding="utf-8"))
    assert preprocess_fixture.assert_matches(state["result"], recorded) == len(recorded["texts"])
