"""The browser sample (export/web) in headless Chromium agrees with `zmdevice predict`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import exported_models
import numpy as np
import pytest
from PIL import Image

from zmdevice.runtime import OnnxClassifier, load_image, run_predict

WEB = Path(__file__).resolve().parent.parent / "export" / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def missing_requirements() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return "Chromium not installed (Debian: apt-get install chromium)"
    if shutil.which("node") is None:
        return "node not installed"
    for package in ("onnxruntime-web", "playwright-core"):
        if not (WEB / "node_modules" / package).is_dir():
            return f"export/web/node_modules/{package} missing (run npm install in export/web)"
    return None


pytestmark = pytest.mark.skipif(
    missing_requirements() is not None, reason=str(missing_requirements())
)


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


def test_page_prediction_equals_zmdevice_predict(models, site):
    root, base = site
    shutil.copy(models["image_onnx"], root / "model.onnx")
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
    names = []
    for i, image in enumerate(chosen):
        names.append(f"input-{i}.png")
        shutil.copy(image, root / names[-1])
    states = open_pages([f"{base}/web/index.html?model=../model.onnx&image=../{n}" for n in names])
    expected = run_predict(models["image_onnx"], [str(p) for p in chosen], top_k=3)
    # Logits too: a trained model's probabilities saturate and hide small pixel differences.
    classifier = OnnxClassifier(models["image_onnx"])
    logits = classifier.logits([load_image(p) for p in chosen])
    for state, want, row in zip(states, expected["predictions"], logits, strict=True):
        assert state["status"] == "done", state
        assert state["result"]["class"] == want["top"][0]["class"], want["input"]
        page = dict(zip(state["result"]["classes"], state["result"]["probabilities"], strict=True))
        for top in want["top"]:
            assert page[top["class"]] == pytest.approx(top["probability"], abs=1e-4), want["input"]
        scale = float(np.abs(row).max())
        np.testing.assert_allclose(state["result"]["logits"], row, rtol=0, atol=1e-5 * scale)
    # images of three different classes: the page is not stuck on one answer
    assert len({state["result"]["class"] for state in states}) == 3


def test_page_refuses_a_text_model_with_a_clear_error(models, site):
    root, base = site
    shutil.copy(models["text_onnx"], root / "text.onnx")
    Image.new("RGB", (16, 16)).save(root / "x.png")
    (state,) = open_pages([f"{base}/web/index.html?model=../text.onnx&image=../x.png"])
    assert state["status"] == "error"
    assert "text model" in state["error"]
