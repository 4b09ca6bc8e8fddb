"""Classify one image or one text with an exported zmdevice model: the smallest app.

Needs only onnxruntime and numpy, plus pillow for images or tokenizers for text; no torch
and no zmdevice. Everything else comes from the model file's metadata (see README.md)::

    python app.py export/NAME.onnx photo.jpg
    python app.py export/NAME.onnx "a sentence to classify"

Prints the three most probable classes, best first: ``class<TAB>probability``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def load(model_path):
    """The session and the zmdevice metadata (classes, modality, preprocess)."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["zmdevice.classes"])
    preprocess = json.loads(meta["zmdevice.preprocess"])
    return session, classes, meta["zmdevice.modality"], preprocess


def image_inputs(path, preprocess):
    """pixel_values float32 [1, 3, S, S]: RGB, bilinear resize, /255, (x - mean) / std."""
    from PIL import Image

    image = Image.open(path)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # transparent pixels on white, as zmdevice's training data reader does
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    size = preprocess["image_size"]
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / np.float32(255)
    x = (x - np.float32(preprocess["mean"])) / np.float32(preprocess["std"])
    return {"pixel_values": x.transpose(2, 0, 1)[None]}


def text_inputs(text, preprocess, model_path):
    """input_ids and attention_mask int64 [1, L], truncated to max_length tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_path).parent / preprocess["tokenizer"]))
    tokenizer.enable_truncation(max_length=preprocess["max_length"])
    encoding = tokenizer.encode(text)
    return {
        "input_ids": np.array([encoding.ids], dtype=np.int64),
        "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
    }


def main(model_path, item):
    session, classes, modality, preprocess = load(model_path)
    if modality == "image":
        inputs = image_inputs(item, preprocess)
    else:
        inputs = text_inputs(item, preprocess, model_path)
    logits = session.run(["logits"], inputs)[0][0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    for index in np.argsort(-probabilities)[:3]:
        print(f"{classes[index]}\t{probabilities[index]:.6f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python app.py MODEL.onnx (IMAGE_FILE | TEXT)")
    main(sys.argv[1], sys.argv[2])
