"""Classify one image or one text with an exported zmdevice model: the smallest Python app.

Needs onnxruntime and the torch-free part of zmdevice (``zmdevice.runtime``: numpy,
pillow, tokenizers), whose preprocessing functions are the reference that every sample
follows (``web/preprocess.mjs`` is their JavaScript twin). Everything else comes from the
model file's metadata (see README.md)::

    python export/app.py export/NAME.onnx photo.jpg
    python export/app.py export/NAME.onnx "a sentence to classify"

Prints the three most probable classes, best first: ``class<TAB>probability``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zmdevice.runtime import (
    configure_tokenizer,
    encode_texts,
    load_image,
    preprocess_image,
    softmax,
)


def load(model_path):
    """The session and the zmdevice metadata (classes, modality, preprocess)."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["zmdevice.classes"])
    preprocess = json.loads(meta["zmdevice.preprocess"])
    return session, classes, meta["zmdevice.modality"], preprocess


def model_inputs(item, modality, preprocess, model_path):
    """The feed dict: pixel_values [1, 3, S, S], or input_ids and attention_mask [1, L]."""
    if modality == "image":
        return {"pixel_values": preprocess_image(load_image(Path(item)), preprocess)[None]}
    from tokenizers import Tokenizer

    # the tokenizer file lies next to the model; its name comes from the metadata
    tokenizer = Tokenizer.from_file(str(Path(model_path).parent / preprocess["tokenizer"]))
    return encode_texts(configure_tokenizer(tokenizer, preprocess), [item])


def main(model_path, item):
    session, classes, modality, preprocess = load(model_path)
    logits = session.run(["logits"], model_inputs(item, modality, preprocess, model_path))[0]
    probabilities = softmax(logits)[0]
    for index in np.argsort(-probabilities)[:3]:
        print(f"{classes[index]}\t{probabilities[index]:.6f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python app.py MODEL.onnx (IMAGE_FILE | TEXT)")
    main(sys.argv[1], sys.argv[2])
