"""The Node.js sample (export/node) agrees with `zmdevice predict`: command line and HTTP.

It shares export/web/preprocess.mjs with the browser page; here that module is also run
on tests/fixtures/preprocess.json under Node and must reproduce the Python runtime.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import exported_models
import numpy as np
import preprocess_fixture
import pytest
from PIL import Image

from zmdevice.images import MAX_IMAGE_PIXELS
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
    """Start serve.mjs for a model on a free port; yields a function (model, *flags) -> base URL."""
    started = []

    def start(model_path: Path, *flags: str) -> str:
        process = subprocess.Popen(
            ["node", "serve.mjs", str(model_path), "--port", "0", "--top-k", "2", *flags],
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


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, head: bytes, timeout: float = 10) -> socket.socket:
    """A raw connection to the server that has sent `head` (request line, headers, ...)."""
    sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=timeout)
    sock.sendall(head)
    return sock


def response_of(sock: socket.socket) -> tuple[int, dict | None, bool]:
    """Status, JSON body (None if empty) and whether the server closed the connection after
    (it said `connection: close` and did close; a kept-alive one is not waited on).

    A server that does not answer, or says it closes and does not, makes the socket time
    out, failing the test.
    """
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    closed = response.will_close and sock.recv(1) == b""
    sock.close()
    return response.status, (json.loads(body) if body else None), closed


def refused(url: str, body: bytes, content_type: str | None) -> tuple[int, str]:
    """The status and the error message of a request that the server refuses."""
    headers = {} if content_type is None else {"content-type": content_type}
    request = urllib.request.Request(url + "/classify", data=body, headers=headers)
    if content_type is None:
        request.remove_header("Content-type")  # urllib adds a form type otherwise
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    message = json.loads(error.value.read())["error"]
    assert isinstance(message, str) and message and "\n" not in message
    return error.value.code, message


def head(length: int | str, content_type: str = "application/json") -> bytes:
    """A POST /classify request line and headers; `length` a Content-Length or "chunked"."""
    size = "Transfer-Encoding: chunked" if length == "chunked" else f"Content-Length: {length}"
    return (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"{size}\r\n\r\n"
    ).encode()


def test_node_http_refuses_more_texts_than_max_items(models, server):
    url = server(models["text_onnx"], "--max-items", "3")
    three = json.dumps({"texts": ["a dog"] * 3}).encode()
    assert len(post(url + "/classify", three, "application/json")["predictions"]) == 3
    four = json.dumps({"texts": ["a dog"] * 4}).encode()
    status, message = refused(url, four, "application/json")
    assert status == 413
    assert message == "4 texts in one request, at most 3 (--max-items)"


def test_node_http_answers_429_beyond_max_concurrent_requests(models, server):
    url = server(models["text_onnx"], "--max-concurrent", "1")
    body = json.dumps({"text": "a small dog"}).encode()
    # in flight: headers and part of the body sent, the rest held back
    held = connect(url, head(len(body)) + body[:5])
    time.sleep(0.5)
    status, reply, closed = response_of(connect(url, head(len(body)) + body))
    assert (status, closed) == (429, True)
    assert reply["error"] == "1 requests in flight, at most 1 (--max-concurrent)"
    with urllib.request.urlopen(url + "/", timeout=10) as info:  # GET / is not limited
        assert info.status == 200
    held.sendall(body[5:])
    status, reply, _ = response_of(held)
    assert status == 200 and len(reply["predictions"]) == 1
    # the slot is free again
    assert len(post(url + "/classify", body, "application/json")["predictions"]) == 1
    # a client that hangs up in the middle of its body frees its slot as well
    connect(url, head(len(body)) + body[:5]).close()
    time.sleep(0.5)
    assert len(post(url + "/classify", body, "application/json")["predictions"]) == 1


def test_node_http_refuses_an_oversized_body_at_once_and_closes(models, server):
    url = server(models["text_onnx"], "--max-body-mb", "1")
    limit = 1024 * 1024
    started = time.monotonic()
    # declared too large: answered before any of the body is sent
    status, reply, closed = response_of(connect(url, head(30 * limit)))
    assert (status, closed) == (413, True)
    assert reply["error"] == f"request body over {limit} bytes (--max-body-mb)"
    # streamed (no length): answered once the bytes read pass the limit, not at the end
    chunk = b"x" * (limit + limit // 2)
    status, reply, closed = response_of(
        connect(url, head("chunked") + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    )
    assert (status, closed) == (413, True)
    assert time.monotonic() - started < 10  # the server's own timeout is 30 s


def test_node_http_times_out_a_stalled_request(models, server):
    url = server(models["text_onnx"], "--timeout-s", "1")
    started = time.monotonic()
    # headers sent, the body never comes: a JSON 408
    status, reply, closed = response_of(connect(url, head(50) + b"{"))
    assert (status, closed) == (408, True)
    assert reply["error"] == "request body not received within 1 s (--timeout-s)"
    assert time.monotonic() - started < 5
    # a body trickled a byte at a time: the limit is on the whole body, not between bytes
    started = time.monotonic()
    sock = connect(url, head(100))
    with pytest.raises(OSError):  # the server closes while bytes are still coming
        for _ in range(50):  # 10 s at most
            sock.sendall(b" ")
            time.sleep(0.2)
    assert time.monotonic() - started < 5
    sock.close()
    # headers never finished: Node answers 408 and closes
    started = time.monotonic()
    sock = connect(url, b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 5


def test_node_http_refuses_bad_requests_with_one_line_errors(models, server):
    url = server(models["text_onnx"])
    texts = json.dumps({"texts": ["a dog"]}).encode()
    assert refused(url, b'{"texts": ["a dog"', "application/json")[0] == 400
    assert refused(url, b'{"texts": ["a dog"', "application/json")[1].startswith("malformed JSON: ")
    assert refused(url, texts, "text/plain") == (
        415,
        "content-type 'text/plain' for a text model: send application/json",
    )
    assert refused(url, texts, None)[0] == 415
    assert refused(url, b'{"texts": ["a dog", 3]}', "application/json") == (
        400,
        "text 1 is number, not a string",
    )
    assert refused(url, b'{"texts": [null]}', "application/json") == (
        400,
        "text 0 is null, not a string",
    )
    for body in (b"null", b"[]", b'{"texts": "a dog"}', b'{"words": ["a dog"]}'):
        assert refused(url, body, "application/json") == (
            400,
            'send {"text": "..."} or {"texts": ["...", ...]}',
        ), body
    assert refused(url, b'{"texts": ["a \xff dog"]}', "application/json") == (
        400,
        "the body is not UTF-8 text",
    )
    assert refused(url, b'{"text": "a dog", "texts": ["a cat"]}', "application/json") == (
        400,
        'send "text" or "texts", not both',
    )
    # charset parameters and a leading byte order mark are fine
    assert post(url + "/classify", texts, "application/json; charset=utf-8")["predictions"]
    assert post(url + "/classify", b"\xef\xbb\xbf" + texts, "application/json")["predictions"]

    image_url = server(models["image_onnx"])
    assert refused(image_url, texts, "application/json")[0] == 415


def test_node_http_refuses_deeply_nested_json_without_parsing_it(models, server):
    url = server(models["text_onnx"])
    depth = 6_000_000  # 12 MB: JSON.parse would hold the event loop for seconds
    started = time.monotonic()
    status, message = refused(url, b"[" * depth + b"]" * depth, "application/json")
    elapsed = time.monotonic() - started
    assert (status, message) == (
        400,
        'JSON nested deeper than 8 levels: send {"texts": ["...", ...]}',
    )
    assert elapsed < 3, f"answered in {elapsed:.1f} s"
    # brackets inside strings are text, not nesting
    deep_text = json.dumps({"texts": ["[[[[[[[[[[ {{{{{{{{{{ \\" + '"' + " a dog"]}).encode()
    assert len(post(url + "/classify", deep_text, "application/json")["predictions"]) == 1


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height 8-bit RGB pixels (not all sent)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 1000)) * 2000, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG start (APP0 and a baseline frame header) declaring width x height."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    frame = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + b"\xff\xc0" + frame + b"\x00" * 1000


def test_node_http_refuses_images_declaring_more_pixels_than_python(models, server):
    url = server(models["image_onnx"])
    limit = f"{MAX_IMAGE_PIXELS:,} decoded at most"
    started = time.monotonic()
    bomb = png_declaring(20000, 20000)
    assert refused(url, bomb, "image/png") == (
        400,
        f"20000 x 20000 pixels is more than the {limit}",
    )
    # one pixel over the Python limit
    side = int(MAX_IMAGE_PIXELS**0.5)
    status, message = refused(url, png_declaring(side, side + 1), "image/png")
    assert (status, message) == (400, f"{side} x {side + 1} pixels is more than the {limit}")
    # IHDR not the first chunk: its size cannot be checked before decoding, so refused
    bomb_late = bomb[:8] + bytes.fromhex("00000000") + b"tEXt" + bytes(4) + bomb[8:]
    assert refused(url, bomb_late, "image/png") == (
        400,
        "cannot decode PNG: no IHDR header chunk first",
    )
    status, message = refused(url, jpeg_declaring(30000, 30000), "image/jpeg")
    assert (status, message) == (400, f"30000 x 30000 pixels is more than the {limit}")
    assert time.monotonic() - started < 10
    # a small image declared as it is still works
    small = sorted(Path(models["image_test"]).rglob("*.png"))[0]
    assert post(url + "/classify", small.read_bytes(), "image/png")["predictions"]


def test_node_http_answers_a_huge_text_fast_and_stays_responsive(models, server):
    url = server(models["text_onnx"])
    words = exported_models.ANIMAL_WORDS + exported_models.PLANT_WORDS + ["the", "a", "red"]
    rng = np.random.default_rng(3)
    long_text = " ".join(str(w) for w in rng.choice(words, 5000))  # ~20 000 characters
    huge = long_text + " tree" * 3_000_000  # ~15 MB; cannot change the first tokens
    request = head(len(body := json.dumps({"texts": [huge, long_text]}).encode())) + body
    sock = connect(url, b"", timeout=30)
    sock.sendall(request)  # returns once the server has read all but the socket buffers
    sent = time.monotonic()
    answered = {}

    def get_info():
        with urllib.request.urlopen(url + "/", timeout=10) as info:
            answered["info"] = info.status, time.monotonic() - sent

    getter = threading.Thread(target=get_info)
    getter.start()
    status, reply, _ = response_of(sock)
    elapsed = time.monotonic() - sent
    getter.join(timeout=15)
    # tokenizing all 15 MB would take over 10 s, and GET / would wait as long
    print(f"15 MB text answered in {elapsed:.2f} s, GET / in {answered['info'][1]:.2f} s")
    assert status == 200 and elapsed < 5, f"15 MB text answered in {elapsed:.1f} s"
    assert answered["info"][0] == 200 and answered["info"][1] < 5
    # exact: both equal the Python runtime on the whole (not cut) 20 000-character text
    expected = OnnxClassifier(models["text_onnx"]).logits([long_text])[0]
    scale = float(np.abs(expected).max())
    for prediction in reply["predictions"]:
        np.testing.assert_allclose(prediction["logits"], expected, rtol=0, atol=1e-5 * scale)
    # a long text without enough words to cut it exactly is refused, fast
    status, message = refused(
        url, json.dumps({"texts": ["a dog", " " * 9000 + "dog"]}).encode(), "application/json"
    )
    assert status == 400 and message.startswith("text 1: a text of 9003 characters")


def tokenizer_outside(models, tmp_path: Path) -> Path:
    """A copy of the text model whose metadata names a tokenizer outside its folder."""
    import onnx

    model = onnx.load(str(models["text_onnx"]))
    for prop in model.metadata_props:
        if prop.key == "zmdevice.preprocess":
            preprocess = json.loads(prop.value)
            preprocess["tokenizer"] = "../outside.tokenizer.json"
            prop.value = json.dumps(preprocess)
    (tmp_path / "model").mkdir()
    onnx.save(model, str(tmp_path / "model" / "evil.onnx"))
    original = Path(models["text_onnx"]).with_suffix("").with_suffix(".tokenizer.json")
    (tmp_path / "outside.tokenizer.json").write_text(original.read_text(encoding="utf-8"))
    return tmp_path / "model" / "evil.onnx"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("port-out-of-range", "error: --port must be an integer from 0 to 65535, not '70000'"),
        ("port-not-a-number", "error: --port must be an integer from 0 to 65535, not 'abc'"),
        ("port-in-use", "error: cannot listen on 127.0.0.1:{port}: EADDRINUSE"),
        ("not-onnx", "error: {model} is not an ONNX file"),
        ("empty-file", "error: {model}: this .onnx file has no zmdevice metadata"),
        ("missing-file", "error: cannot read model {model}: ENOENT"),
        ("tokenizer-outside", "error: {model}: tokenizer name '../outside.tokenizer.json'"),
        ("bad-option", "error: --max-concurrent must be an integer >= 1, not '0'"),
        ("unknown-flag", "error: usage: node serve.mjs MODEL.onnx"),
    ],
)
def test_node_server_startup_errors_are_one_line(models, tmp_path, case, expected):
    model, flags = Path(models["text_onnx"]), []
    busy = socket.socket()  # a port in use
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    if case.startswith("port-"):
        value = {"port-out-of-range": "70000", "port-not-a-number": "abc"}.get(case, str(port))
        flags = ["--port", value]
    elif case == "not-onnx":
        model = tmp_path / "notes.onnx"
        model.write_bytes(b"this is not an onnx model\n" * 40)
    elif case == "empty-file":
        model = tmp_path / "empty.onnx"
        model.write_bytes(b"")
    elif case == "missing-file":
        model = tmp_path / "missing.onnx"
    elif case == "tokenizer-outside":
        model = tokenizer_outside(models, tmp_path)
    elif case == "bad-option":
        flags = ["--max-concurrent", "0"]
    elif case == "unknown-flag":
        flags = ["--workers", "2"]
    with busy:
        done = subprocess.run(
            ["node", "serve.mjs", str(model), *flags],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=NODE_SAMPLE,
        )
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(expected.format(model=model, port=port)), lines[0]
