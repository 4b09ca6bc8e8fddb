"""The shared preprocessing fixture: inputs and the Python runtime's tensors and token ids.

``tests/fixtures/preprocess.json`` (with ``preprocess.tokenizer.json``) is what every
implementation of the preprocessing contract is tested against: the Python runtime
(test_preprocess_contract.py), the JavaScript module in headless Chromium (test_web.py)
and in Node.js (test_node.py). The expected values are the Python runtime's
(``runtime.preprocess_image`` and ``runtime.encode_texts``). Rewrite the files after a
deliberate change of the contract with::

    PYTHONPATH=. python tests/preprocess_fixture.py
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "preprocess.json"
TOKENIZER = FIXTURES / "preprocess.tokenizer.json"
IMAGE_PREPROCESS = {
    "image_size": 8,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "channel_order": "RGB",
}
TEXT_PREPROCESS = {"max_length": 16, "tokenizer": TOKENIZER.name, "pad_token_id": 0}
# (name, PIL mode, width, height): grey, grey+alpha, RGB and RGBA, down- and upscaled,
# odd sizes, one already S x S (no resize).
IMAGES = [
    ("rgb-8x8-no-resize", "RGB", 8, 8),
    ("rgb-61x37-downscale", "RGB", 61, 37),
    ("rgb-5x3-upscale", "RGB", 5, 3),
    ("grey-13x9", "L", 13, 9),
    ("grey-alpha-10x10", "LA", 10, 10),
    ("rgba-17x11-alpha-0-to-255", "RGBA", 17, 11),
    ("rgba-8x8-no-resize", "RGBA", 8, 8),
]
TEXTS = [
    ("plain", "the dog and the cat"),
    ("uppercase", "THE Dog AND The CAT"),
    ("accents", "Héllo Wörld, café crème brûlée"),
    ("combining-accent", "cafe\u0301 nai\u0308ve"),
    ("emoji", "good dog 🐶🐕‍🦺 love ❤️"),
    ("cjk", "中文 字符 和 dog 日本語テキスト"),
    ("punctuation", "don't stop—now! (a/b) 50% & $3.5"),
    ("whitespace-controls", "tab\tnew\nline\r\x00bell\x07 end"),
    ("empty", ""),
    ("empty-after-normalisation", " \u200b\u0301 \t "),
    ("very-long", " ".join(["the red tree"] * 40) + " and a flower"),
    ("long-word", "a" * 150),
]


def _pixels(mode: str, width: int, height: int, seed: int) -> np.ndarray:
    """Random 8-bit pixels; alpha planes sweep 0..255 so every blending case is hit."""
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels))
    if mode in ("LA", "RGBA"):
        pixels[:, :, -1] = np.linspace(0, 255, width * height).round().reshape(height, width)
    return pixels.astype(np.uint8)


def tokenizer():
    from tokenizers import Tokenizer

    from zmdevice.runtime import configure_tokenizer

    return configure_tokenizer(Tokenizer.from_file(str(TOKENIZER)), TEXT_PREPROCESS)


def expected_image(image: dict) -> np.ndarray:
    """The Python runtime's pixel_values [3, S, S] for one fixture image."""
    from PIL import Image

    from zmdevice.runtime import preprocess_image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[image["channels"]]
    shape = (image["height"], image["width"], image["channels"])
    array = np.frombuffer(base64.b64decode(image["pixels"]), dtype=np.uint8).reshape(shape)
    picture = Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode)
    return preprocess_image(picture, IMAGE_PREPROCESS)


def build() -> dict:
    """The fixture, computed now by the Python runtime."""
    from zmdevice.runtime import encode_texts

    images = []
    for seed, (name, mode, width, height) in enumerate(IMAGES):
        pixels = _pixels(mode, width, height, seed)
        image = {
            "name": name,
            "width": width,
            "height": height,
            "channels": pixels.shape[-1],
            "pixels": base64.b64encode(pixels.tobytes()).decode("ascii"),
        }
        image["pixel_values"] = [round(float(x), 7) for x in expected_image(image).ravel()]
        images.append(image)
    texts = [text for _, text in TEXTS]
    batch = encode_texts(tokenizer(), texts)
    return {
        "about": "inputs and zmdevice's Python runtime outputs: tests/preprocess_fixture.py",
        "image_preprocess": IMAGE_PREPROCESS,
        "text_preprocess": TEXT_PREPROCESS,
        "images": images,
        "texts": [
            {
                "name": name,
                "text": text,
                "ids": [int(i) for i, m in zip(ids, mask, strict=True) if m],
            }
            for (name, text), ids, mask in zip(
                TEXTS, batch["input_ids"], batch["attention_mask"], strict=True
            )
        ],
        "batch": {key: value.tolist() for key, value in batch.items()},
    }


def assert_matches(result: dict, recorded: dict) -> int:
    """Assert that JavaScript's ``runFixture()`` output equals the recorded Python values.

    Returns:
        how many texts got token ids equal to Python's (all of them, or this fails).
    """
    assert [i["name"] for i in result["images"]] == [i["name"] for i in recorded["images"]]
    for got, want in zip(result["images"], recorded["images"], strict=True):
        difference = np.abs(np.subtract(got["pixel_values"], want["pixel_values"])).max()
        assert difference <= 1e-6, (want["name"], difference)
    pairs = zip(result["texts"], recorded["texts"], strict=True)
    equal = [got["ids"] == want["ids"] for got, want in pairs]
    mismatched = [t["name"] for t, same in zip(recorded["texts"], equal, strict=True) if not same]
    assert not mismatched, mismatched
    rows, length = result["batch"]["dims"]
    for key in ("input_ids", "attention_mask"):
        assert np.reshape(result["batch"][key], (rows, length)).tolist() == recorded["batch"][key]
    return sum(equal)


def missing_npm_packages(sample: Path, packages: tuple[str, ...]) -> str | None:
    """Why a JavaScript sample folder (export/web, export/node) cannot be tested, or None."""
    import shutil

    if shutil.which("node") is None:
        return "node not installed"
    for package in packages:
        if not (sample / "node_modules" / package).is_dir():
            return f"{sample.name}/node_modules/{package} missing (run npm ci in {sample})"
    return None


def write() -> None:
    from zmdevice.students import tiny_tokenizer

    FIXTURES.mkdir(exist_ok=True)
    TOKENIZER.write_text(tiny_tokenizer().to_str(pretty=True) + "\n", encoding="utf-8")
    FIXTURE.write_text(json.dumps(build(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write()
