"""The parity check of an export: inputs preprocessed as the runtime does, and onnxruntime's
logits compared with PyTorch's relative to their scale (``check_parity``). ``ort_format``
holds its .ort files to the same tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmdevice.exporting.onnx_file import ExportError

PARITY_TOLERANCE = 1e-4
"""Max |onnxruntime - PyTorch| over all parity logits, relative to max |PyTorch logit|."""
PARITY_BATCH_SIZES = (1, 3, 8)
SYNTHETIC_TEXTS = (
    "a dog",
    "bread",
    "a small red bird sat on the branch of a tree",
    "the river runs through the city past an old stone bridge",
    "something used as a tool to fix a car or a house, made of metal and wood",
    "a person who works with children at a school in the country",
    "water",
    "the fruit of a plant that grows in warm places and is eaten fresh or dried",
)


@dataclass
class ParityReport:
    """How closely onnxruntime reproduces PyTorch's logits on the parity inputs."""

    max_abs_error: float
    """Largest |onnxruntime - PyTorch| logit difference over all cases."""
    logit_scale: float
    """Largest |PyTorch logit| over all cases (the scale errors are measured against)."""
    relative_error: float
    """max_abs_error / logit_scale."""
    argmax_agreement: float
    """Fraction of samples whose top class is the same in both."""
    cases: list[list[int]]
    """[batch size, sequence length (0 for images)] of each compared case."""
    inputs: str
    """Where the inputs came from ('training data ...' or 'synthetic ...')."""


def parity_examples(
    modality: str, preprocess: dict, examples: list | None, source: str | None
) -> tuple[list, str]:
    """The parity inputs and where they came from: ``examples`` when given (``source``, else
    their count), else synthetic images of the model's size or ``SYNTHETIC_TEXTS``."""
    if examples:
        return list(examples), source or f"{len(examples)} given inputs"
    if modality == "image":
        synthetic = synthetic_images(int(preprocess["image_size"]))
    else:
        synthetic = list(SYNTHETIC_TEXTS)
    return synthetic, source or "synthetic inputs"


def synthetic_images(image_size: int, count: int = 8, seed: int = 0) -> list:
    """Random RGB PIL images of assorted sizes (so the resize path runs too)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [image_size, image_size * 2, max(image_size // 2, 4), image_size + 5]
    images = []
    for i in range(count):
        side = sizes[i % len(sizes)]
        # Smooth blobs rather than white noise: closer to real photos after resizing.
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((side, side), Image.BILINEAR))
    return images


def parity_feeds(student, examples: list, tokenizer=None) -> list[dict[str, np.ndarray]]:
    """Model inputs for the parity check, preprocessed exactly as the runtime does.

    Images: batches of 1, 3 and 8 images (examples are cycled). Text: batch 1 truncated to
    max_length / 2 tokens, batch 3 truncated to 3/4 max_length and padded to its longest
    text, batch 8 padded to max_length: several sequence lengths, with padding, even when
    every example is longer than max_length.

    Args:
        student: the student (for its preprocessing settings).
        examples: PIL images or strings (at least one).
        tokenizer: for text, a ``tokenizers.Tokenizer`` set up by
            ``runtime.configure_tokenizer`` (its truncation is changed here).
    """
    from zmdevice.runtime import preprocess_image

    cycled = [examples[i % len(examples)] for i in range(max(PARITY_BATCH_SIZES))]
    if student.modality == "image":
        preprocess = student.config["preprocess"]
        pixels = np.stack([preprocess_image(image, preprocess) for image in cycled])
        return [{"pixel_values": pixels[:size]} for size in PARITY_BATCH_SIZES]
    max_length = int(student.config["preprocess"]["max_length"])
    pad_id = int(student.config["preprocess"]["pad_token_id"])
    limits = (max(2, max_length // 2), max(2, 3 * max_length // 4), max_length)
    feeds = []
    for size, limit in zip(PARITY_BATCH_SIZES, limits, strict=True):
        tokenizer.enable_truncation(max_length=limit)
        encodings = tokenizer.encode_batch(list(cycled[:size]))
        # The tokenizer pads to the batch's longest text; the last case pads to max_length.
        length = max_length if limit == max_length else len(encodings[0].ids)
        ids = np.full((size, length), pad_id, dtype=np.int64)
        mask = np.zeros((size, length), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            count = sum(encoding.attention_mask)
            ids[i, :count] = encoding.ids[:count]
            mask[i, :count] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    tokenizer.enable_truncation(max_length=max_length)
    return feeds


def check_parity(student, model_bytes: bytes, feeds: list[dict], inputs: str, tolerance: float):
    """Run onnxruntime and PyTorch on the same feeds; ExportError beyond ``tolerance``.

    The error is measured relative to the largest PyTorch logit: an untrained network's
    logits can be ~1e-11, where any absolute tolerance would pass anything.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    student = student.eval()
    max_abs, scale, agree, total, cases = 0.0, 0.0, 0, 0, []
    for feed in feeds:
        with torch.no_grad():
            expected = student(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
        got = session.run(["logits"], feed)[0]
        if got.shape != expected.shape:
            raise ExportError(f"ONNX logits have shape {got.shape}, PyTorch {expected.shape}")
        max_abs = max(max_abs, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(expected)
        first = next(iter(feed.values()))
        cases.append([int(first.shape[0]), int(first.shape[1]) if first.ndim == 2 else 0])
    relative = max_abs / max(scale, 1e-30)
    report = ParityReport(max_abs, scale, relative, agree / max(total, 1), cases, inputs)
    if not np.isfinite(relative) or relative > tolerance:
        raise ExportError(
            f"ONNX export disagrees with PyTorch: max relative logit error {relative:.2e} "
            f"(max abs {max_abs:.2e}, logit scale {scale:.2e}) exceeds {tolerance:.0e} "
            f"on {inputs}; report this with the student's config.json"
        )
    return report
