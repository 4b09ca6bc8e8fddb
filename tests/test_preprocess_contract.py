"""The Python runtime still computes what the shared preprocessing fixture records.

tests/fixtures/preprocess.json holds inputs (grey/grey+alpha/RGB/RGBA images of odd sizes,
tricky texts) and the tensors and token ids of ``zmdevice.runtime``. The JavaScript module
(export/web/preprocess.mjs) is tested against the same file in the browser (test_web.py)
and in Node.js (test_node.py), so all implementations agree through it.
"""

from __future__ import annotations

import json

import numpy as np
import preprocess_fixture
import pytest


@pytest.fixture(scope="module")
def recorded():
    return json.loads(preprocess_fixture.FIXTURE.read_text(encoding="utf-8"))


def test_runtime_reproduces_the_recorded_pixel_values(recorded):
    assert {image["channels"] for image in recorded["images"]} == {1, 2, 3, 4}
    for image in recorded["images"]:
        got = preprocess_fixture.expected_image(image)
        size = recorded["image_preprocess"]["image_size"]
        assert got.shape == (3, size, size)
        np.testing.assert_allclose(got.ravel(), image["pixel_values"], rtol=0, atol=1e-6)


def test_runtime_reproduces_the_recorded_token_ids(recorded):
    fresh = preprocess_fixture.build()
    assert [t["ids"] for t in fresh["texts"]] == [t["ids"] for t in recorded["texts"]]
    assert fresh["batch"] == recorded["batch"]
    limit = recorded["text_preprocess"]["max_length"]
    by_name = {t["name"]: t["ids"] for t in recorded["texts"]}
    # the fixture covers truncation, empty input and characters the vocabulary lacks
    assert len(by_name["very-long"]) == limit
    assert len(by_name["empty-after-normalisation"]) == 2 == len(by_name["empty"])
    assert by_name["plain"] == by_name["uppercase"]
    unknown = preprocess_fixture.tokenizer().token_to_id("[UNK]")
    assert unknown in by_name["cjk"] and unknown in by_name["emoji"]
