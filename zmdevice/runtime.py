"""Run an exported student with onnxruntime: predict and evaluate without torch.

This module is the runtime side of zmdevice. It imports only numpy, onnxruntime, pillow
and tokenizers (each lazily, inside the function that needs it) and never torch, so an
app or a server that ships ``NAME.onnx`` needs nothing of the training stack. Everything
the model needs to be used correctly travels in the ONNX file's ``metadata_props``
(see ``export/README.md``): class names, modality, and preprocessing (image size, mean,
std) or tokenizer settings; the tokenizer file of a text model lies next to the .onnx.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from zmdevice.cores import usable_cores
from zmdevice.errors import UserError
from zmdevice.images import IMAGE_EXTENSIONS, scan_images
from zmdevice.scoring import evaluate_labeled, predict_in_batches
from zmdevice.tables import TABLE_SUFFIXES

METADATA_PREFIX = "zmdevice."
BATCH_SIZE = 32
MODEL_INPUTS = {"image": ["pixel_values"], "text": ["input_ids", "attention_mask"]}
"""The input names of an exported model, by modality (``export._input_names`` writes them)."""


def _open_session(path: Path, providers: list[str], threads: int | None = None):
    """An onnxruntime session and its custom metadata; UserError names a bad file."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    import onnxruntime as ort

    options = ort.SessionOptions()
    # onnxruntime's default is one thread per core of the machine: under taskset or a
    # container's CPU limit that oversubscribes the cores given (1.3x slower measured on one
    # pinned core of two, benchmarks/bench_peers.py).
    options.intra_op_num_threads = threads or usable_cores()
    # onnxruntime logs warnings (e.g. unused initialisers) to stderr; users get our errors.
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types.
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserError(
            f"{path} is not a readable ONNX model ({reason}); "
            "re-create it with `zmdevice export models/NAME`"
        ) from None
    return session, dict(session.get_modelmeta().custom_metadata_map)


def _json_field(metadata: dict[str, str], key: str, path: Path):
    """Decode one JSON-valued metadata entry, naming the file and key when it is bad."""
    full_key = METADATA_PREFIX + key
    if full_key not in metadata:
        raise UserError(
            f"{path} has no '{full_key}' metadata: it was not exported by zmdevice; "
            "export the student with `zmdevice export models/NAME`"
        )
    try:
        return json.loads(metadata[full_key])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata '{full_key}' is not valid JSON") from None


def _providers(device: str) -> list[str]:
    """onnxruntime execution providers for a zmdevice ``--device`` value."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    base = device.split(":", 1)[0]
    if base in ("cpu", "mps"):
        # onnxruntime has no MPS provider; CoreML is a different trade-off, so stay on CPU.
        return ["CPUExecutionProvider"]
    if base == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                f"--device {device}: this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu) or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if base == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise UserError(f"unknown device '{device}': use one of auto, cpu, cuda, cuda:N, mps")


def preprocess_image(image, preprocess: dict) -> np.ndarray:
    """The image reference: the numpy twin of ``augment.image_transforms(...)["clean"]``.

    RGB (``data.to_rgb``) -> resize to (S, S) with PIL's bilinear filter -> [0, 1] ->
    (x - mean) / std -> CHW.
    torchvision's ``Resize`` on a PIL image calls the same ``Image.resize``, so both sides
    see identical pixels. ``export/web/preprocess.mjs`` is the JavaScript twin (browser and
    Node), tested against ``tests/fixtures/preprocess.json``.

    Args:
        image: a ``PIL.Image.Image`` of any mode and size.
        preprocess: the model's ``zmdevice.preprocess`` metadata (``image_size``, ``mean``,
            ``std``, optional ``channel_order`` "RGB"/"BGR").

    Returns:
        float32 array [3, S, S].
    """
    from PIL import Image

    from zmdevice.images import to_rgb

    size = int(preprocess["image_size"])
    image = to_rgb(image)  # the training data's conversion: transparency on white
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
    if preprocess.get("channel_order", "RGB").upper() == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(preprocess["mean"], dtype=np.float32)
    std = np.asarray(preprocess["std"], dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def load_image(path: Path):
    """Open an image file fully (so corrupt or oversized files fail here, naming the file)."""
    from zmdevice.images import UnreadableImage, open_image

    if not Path(path).is_file():
        raise UserError(f"image file not found: {path}")
    try:
        return open_image(Path(path))
    except UnreadableImage as error:
        raise UserError(
            f"cannot read image {path}: {error.reason}; remove or replace the file"
        ) from None


def configure_tokenizer(tokenizer, preprocess: dict):
    """Set a ``tokenizers.Tokenizer`` up as the student was trained: truncate to
    ``max_length`` tokens (special tokens included), right-pad with ``pad_token_id`` to the
    longest text of the batch. Returns the same tokenizer.
    """
    tokenizer.enable_truncation(max_length=int(preprocess["max_length"]))
    pad_id = int(preprocess.get("pad_token_id", 0))
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
    return tokenizer


def encode_texts(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The text reference: ``input_ids`` and ``attention_mask`` int64 [B, L] of a batch.

    ``tokenizer`` comes from ``configure_tokenizer``: its normaliser lowercases, [CLS]/[SEP]
    are added, each text is cut to ``max_length`` ids and the batch is right-padded to its
    longest text with ``pad_token_id`` (mask 0). ``export/web/preprocess.mjs`` is the
    JavaScript twin, tested against ``tests/fixtures/preprocess.json``.
    """
    encodings = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits [N, C], computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxClassifier:
    """An exported zmdevice student: metadata, preprocessing and an onnxruntime session.

    Attributes:
        path: the .onnx file.
        classes: class names, index = logit column.
        modality: "image" or "text".
        preprocess: image settings (image_size, mean, std, channel_order, resize) or text
            settings (max_length, tokenizer file name, pad_token_id).
        metadata: every ``zmdevice.*`` metadata entry, decoded where it is JSON.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None):
        """Open ``path``; UserError for a missing/corrupt file or a missing tokenizer file."""
        from zmdevice.config import check_device, checked_value, shown

        if not isinstance(path, str | os.PathLike):
            raise UserError(f"model path: expected an exported .onnx file, got {shown(path)}")
        threads = checked_value("threads", threads, "int | None")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1 or None, got {threads}")
        self.path = Path(path)
        self.session, raw = _open_session(self.path, _providers(check_device(device)), threads)
        self.classes: list[str] = _json_field(raw, "classes", self.path)
        self.preprocess: dict = _json_field(raw, "preprocess", self.path)
        self.modality: str = raw.get(METADATA_PREFIX + "modality", "")
        if self.modality not in ("image", "text"):
            raise UserError(
                f"{self.path}: metadata 'zmdevice.modality' is '{self.modality}', "
                "expected image or text; re-export the model"
            )
        self.metadata = {
            key[len(METADATA_PREFIX) :]: value
            for key, value in raw.items()
            if key.startswith(METADATA_PREFIX)
        }
        self.metadata.update(classes=self.classes, preprocess=self.preprocess)
        self.input_names = [node.name for node in self.session.get_inputs()]
        expected = MODEL_INPUTS[self.modality]
        if sorted(self.input_names) != sorted(expected):
            raise UserError(
                f"{self.path}: a zmdevice {self.modality} model takes the inputs "
                f"{', '.join(expected)}, but this file takes {', '.join(self.input_names)}; "
                "re-export the student with `zmdevice export models/NAME`"
            )
        self.tokenizer = self._load_tokenizer() if self.modality == "text" else None

    @property
    def classes_(self) -> np.ndarray:
        """The class names as a numpy array, in the order of ``predict_proba``'s columns
        (scikit-learn's attribute)."""
        return np.asarray(self.classes)

    def tokenizer_path(self) -> Path:
        """Where the tokenizer file of a text model must lie: next to the .onnx file.

        The metadata names the file, and a model file may come from anyone: a name that is
        not a plain file name in the model's folder (absolute, with a path separator or
        '..', or a link that resolves elsewhere) is refused, never opened.
        """
        name = self.preprocess.get("tokenizer") or f"{self.path.stem}.tokenizer.json"
        separators = {"/", "\\", os.sep, os.altsep} - {None}
        plain = (
            isinstance(name, str)
            and not any(separator in name for separator in separators)
            and ".." not in name
            and not Path(name).is_absolute()
            and "\0" not in name
        )
        folder = self.path.parent
        if plain and (folder / name).resolve().parent == folder.resolve():
            return folder / name
        raise UserError(
            f"{self.path}: metadata 'zmdevice.preprocess' names the tokenizer file "
            f"{json.dumps(name)[:80]}, which is not a file name in the model's folder; "
            "re-export the model with `zmdevice export models/NAME`"
        )

    def _load_tokenizer(self):
        """The ``tokenizers.Tokenizer`` with the export's truncation and padding settings."""
        from tokenizers import Tokenizer

        path = self.tokenizer_path()
        if not path.is_file():
            raise UserError(
                f"tokenizer file missing: {self.path} needs {path}; copy the "
                "NAME.tokenizer.json written by `zmdevice export` next to the model"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except BaseException as error:
            # tokenizers raises a bare Exception on bad JSON and a Rust panic (a
            # BaseException) on some malformed files; neither is the user's bug report.
            if isinstance(error, KeyboardInterrupt | SystemExit):
                raise
            reason = " ".join(str(error).split())[:200]
            raise UserError(
                f"cannot read tokenizer file {path} ({reason}); copy the NAME.tokenizer.json "
                "written by `zmdevice export` next to the model again"
            ) from None
        return configure_tokenizer(tokenizer, self.preprocess)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenise a batch: ``input_ids`` and ``attention_mask`` int64 [B, L], L <= max_length.

        Padding goes to the longest text of the batch (the model has a dynamic length).
        """
        try:
            return encode_texts(self.tokenizer, texts)
        except Exception as error:  # a tokenizer file that loads can still be broken
            raise UserError(
                f"tokenizer file {self.tokenizer_path()} cannot encode texts "
                f"({' '.join(str(error).split())[:200]}); copy the NAME.tokenizer.json written "
                "by `zmdevice export` next to the model again"
            ) from None

    def encode_images(self, images: Sequence) -> dict[str, np.ndarray]:
        """Preprocess PIL images into ``pixel_values`` float32 [B, 3, S, S]."""
        return {"pixel_values": np.stack([preprocess_image(im, self.preprocess) for im in images])}

    def logits(self, inputs: Sequence) -> np.ndarray:
        """Raw logits float32 [N, C] for PIL images (image model) or strings (text model).

        ``inputs`` may also be a ready feed dict of numpy arrays (the model's input names).
        """
        if isinstance(inputs, dict):
            return self.session.run(["logits"], inputs)[0]
        if isinstance(inputs, str | bytes):  # one text would be read as its characters
            kind = type(inputs).__name__
            raise UserError(f"inputs: pass a list of texts (one text: [text]), got a single {kind}")
        feed = self.encode_texts(inputs) if self.modality == "text" else self.encode_images(inputs)
        return self.session.run(["logits"], feed)[0]

    def predict_proba(self, inputs: Sequence, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Class probabilities float32 [N, C] (softmax of the logits), in batches."""
        if not len(inputs):
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        parts = [
            softmax(self.logits(inputs[start : start + batch_size]))
            for start in range(0, len(inputs), batch_size)
        ]
        return np.concatenate(parts)


def _image_inputs(inputs: Iterable[str], classifier: OnnxClassifier) -> list[Path]:
    """Resolve image files, folders and image tables; text -> UserError."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = scan_images(path)
            if not found:
                raise UserError(
                    f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(path / relative for relative in found)
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            from zmdevice.config import DataOptions
            from zmdevice.data import open_dataset

            dataset = open_dataset(path, DataOptions(), modality="image")
            paths.extend(Path(p) for p in dataset.paths)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(
                f"'{_short(item)}' is not an image file or folder: {classifier.path.name} is an "
                "image classifier; pass image files, folders or a table with a 'path' column"
            )
    return paths


def _text_inputs(inputs: Iterable[str], classifier: OnnxClassifier, text_column: str) -> list:
    """Resolve text strings and text tables; images/folders -> UserError."""
    texts: list[tuple[str, str]] = []  # (shown id, text)
    for item in inputs:
        path = Path(item) if len(item) < 4096 else None
        is_file = path is not None and _is_file(path)
        if is_file and path.suffix.lower() in TABLE_SUFFIXES:
            from zmdevice.config import DataOptions
            from zmdevice.data import open_dataset

            dataset = open_dataset(path, DataOptions(text_column=text_column), modality="text")
            texts.extend(zip(dataset.ids, dataset.texts, strict=True))
        elif (is_file and path.suffix.lower() in IMAGE_EXTENSIONS) or (
            path is not None and _is_dir(path)
        ):
            raise UserError(
                f"'{item}' is an image or a folder but {classifier.path.name} is a text "
                "classifier; pass text strings or a CSV/JSONL/Parquet table with a "
                f"'{text_column}' column"
            )
        elif path is not None and path.suffix.lower() in TABLE_SUFFIXES and " " not in item:
            raise UserError(
                f"table not found: {item}; check the path (texts are classified as given, "
                "tables are read by their text column)"
            )
        elif is_file:
            raise UserError(
                f"'{item}' is a file but not a CSV/JSONL/Parquet table: pass the texts as "
                f"strings, or a table with a '{text_column}' column"
            )
        else:
            texts.append((_short(item), item))
    return texts


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a long sentence is not a valid file name
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _short(text: str, width: int = 60) -> str:
    """A one-line, shortened rendering of an input for the summary."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _top_k(probs: np.ndarray, classes: list[str], k: int) -> list[list[dict]]:
    """The ``k`` most probable classes of each row, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"class": classes[j], "probability": float(row[j])} for j in idx]
        for row, idx in zip(probs, order, strict=True)
    ]


def run_predict(
    model: str | Path, inputs: Sequence[str], *, top_k: int = 1, text_column: str = "text"
) -> dict:
    """Classify inputs with an exported model (the `zmdevice predict` command).

    Args:
        model: path to ``NAME.onnx``.
        inputs: image files / folders / image tables for an image model; text strings or
            text tables (CSV/JSONL/Parquet) for a text model.
        top_k: classes reported per input.
        text_column: the text column of a table.

    Returns:
        ``{"model", "modality", "classes", "predictions": [{"input", "top": [{"class",
        "probability"}]}], "lines"}``.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if not inputs:
        raise UserError("no inputs given: pass image files/folders or text strings/tables")
    classifier = OnnxClassifier(model)
    top_k = min(top_k, len(classifier.classes))
    predictions: list[dict] = []
    if classifier.modality == "image":
        paths = _image_inputs(inputs, classifier)
        for start in range(0, len(paths), BATCH_SIZE):
            batch = paths[start : start + BATCH_SIZE]
            probs = classifier.predict_proba([load_image(p) for p in batch])
            for path, top in zip(batch, _top_k(probs, classifier.classes, top_k), strict=True):
                predictions.append({"input": str(path), "top": top})
    else:
        texts = _text_inputs(inputs, classifier, text_column)
        for start in range(0, len(texts), BATCH_SIZE):
            batch = texts[start : start + BATCH_SIZE]
            probs = classifier.predict_proba([text for _, text in batch])
            for (shown, _), top in zip(
                batch, _top_k(probs, classifier.classes, top_k), strict=True
            ):
                predictions.append({"input": shown, "top": top})
    lines = [
        f"{p['input']}\t" + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top"])
        for p in predictions
    ]
    lines.append(f"{len(predictions)} {classifier.modality} input(s) classified by {model}")
    return {
        "model": str(model),
        "modality": classifier.modality,
        "classes": classifier.classes,
        "predictions": predictions,
        "lines": lines,
    }


def predict_dataset(
    classifier: OnnxClassifier, dataset, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Probabilities float32 [N, C] for every sample of a ``zmdevice.data`` dataset."""

    def predict(indices):
        if classifier.modality == "image":
            batch = [dataset.load_image(int(i)) for i in indices]
        else:
            batch = [dataset.texts[i] for i in indices]
        return classifier.predict_proba(batch, batch_size)

    return predict_in_batches(predict, len(dataset), len(classifier.classes), batch_size)


def run_evaluate_onnx(model: str | Path, data: str | Path, device: str = "auto", **columns) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion of an exported model on ``data``
    (``columns``: the table's ``text_column`` and ``label_column``, as ``DataOptions``).

    Returns:
        ``metrics.classification_report`` fields plus ``model``, ``data`` and ``lines``.
    """
    from zmdevice.config import DataOptions

    classifier = OnnxClassifier(model, device=device)
    options = DataOptions(**columns)
    predict = functools.partial(predict_dataset, classifier)
    report, lines = evaluate_labeled(classifier, model, data, options, "the model", predict)
    return {**report, "model": str(model), "data": str(data), "lines": lines}
