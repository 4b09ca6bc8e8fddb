"""``text-embed:<model dir or hub id>``: a sentence encoder as a zero-shot text classifier.

Mean-pooled, L2-normalised sentence embeddings of the text against those of the class
descriptions (the user's prompts, else the class name); softmax(scale * cosine), scale 100
like CLIP's. Its pooled embedding is the feature space ``zmdevice.fewshot`` adapts in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zmdevice.teachers.base import (
    Numerics,
    Request,
    Teacher,
    class_weights,
    existing_path,
    freeze,
    identity,
    load_hf,
    tokenize,
    zero_shot_probs,
)
from zmdevice.teachers.registry import register_teacher

TEXT_EMBED_TEMPLATE = "{label}"
"""Class text for sentence encoders when the classes file gives no description."""
TEXT_EMBED_SCALE = 100.0
"""Logit scale (inverse temperature) on cosine similarities, as CLIP's learned 100."""


def mean_pool(hidden, mask):
    """Mean of token states [B, L, D] over the attention mask [B, L] -> [B, D]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(torch.nn.Module):
    """(input_ids, attention_mask) -> L2-normalised mean-pooled embeddings [B, D], pooling
    in fp32 whatever precision the transformer ran in (bf16 sums over tokens lose digits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = mean_pool(hidden.last_hidden_state.float(), attention_mask)
        return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass
class TokenizeCollate:
    """Collate texts into padded token tensors; runs in loader workers."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list):
        return tokenize(self.tokenizer, list(texts), self.max_length)


def class_texts(classes, template: str) -> dict[str, list[str]]:
    """Per class: the user's prompts/descriptions if any, else ``template`` with the name."""
    return {
        name: list(classes.prompts.get(name) or []) or [template.format(label=name)]
        for name in classes.names
    }


# int8: a transformer, whose matrix products onnxruntime quantises on the fly (no
# calibration data needed, unlike the convolutional imagenet kind).
@register_teacher("text-embed", modality="text", exports_onnx=True, int8=True, has_features=True)
class TextEmbedTeacher(Teacher):
    """Zero-shot text classification by cosine similarity of sentence embeddings."""

    def __init__(self, request: Request, classes, numerics: Numerics):
        from transformers import AutoModel, AutoTokenizer

        rest, entry = request.rest, request.entry
        preprocess = entry.get("preprocess", {})
        max_length = int(preprocess.get("max_length", 128))
        self.scale = float(preprocess.get("scale", TEXT_EMBED_SCALE))
        tokenizer = load_hf("text-embed", rest, AutoTokenizer)
        model = freeze(load_hf("text-embed", rest, AutoModel)).to(numerics.device)
        encoder = SentenceEncoder(model).eval()
        texts = class_texts(classes, preprocess.get("template", TEXT_EMBED_TEMPLATE))
        collate = TokenizeCollate(tokenizer, max_length)
        names = ["input_ids", "attention_mask"]
        # Class weights from the fp32 PyTorch encoder, whatever runs the data: a few texts,
        # and every sample is compared with them.
        with torch.inference_mode():
            self.weights = class_weights(
                [
                    encoder(*(collate(texts[n])[k].to(numerics.device) for k in names))
                    for n in classes.names
                ]
            )
        example = collate([t for n in classes.names for t in texts[n]] + ["a", "b c"])
        self.network = numerics.network(
            encoder,
            tuple(example[k] for k in names),
            names,
            {k: {0: "batch", 1: "sequence"} for k in names},
            (f"text-embed:{rest}", existing_path(rest), {"max_length": max_length}),
        )
        super().__init__(
            request,
            classes.names,
            numerics,
            prepare=identity,
            collate=collate,
            model=model,
            details={
                "preprocess": {"max_length": max_length, "scale": self.scale},
                "prompts": texts,
            },
        )

    def features_and_probs(self, batch):
        """(pooled embeddings [B, D], zero-shot probabilities [B, C])."""
        features = self.network(batch["input_ids"], batch["attention_mask"])
        return features, zero_shot_probs(features, self.weights, self.scale)

    def forward(self, batch):
        return self.features_and_probs(batch)[1]
