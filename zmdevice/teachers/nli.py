"""``nli:<model>``: an NLI cross-encoder as a zero-shot text classifier.

Each class becomes the hypothesis "This example is {label}." (or the class's first prompt);
the entailment logits of the C hypotheses are softmaxed over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zmdevice.errors import UserError
from zmdevice.teachers.base import Numerics, Request, Teacher, freeze, identity, load_hf, tokenize
from zmdevice.teachers.registry import register_teacher

NLI_HYPOTHESIS = "This example is {label}."


@dataclass
class HypothesisCollate:
    """Texts -> the tokenised (text, hypothesis) pairs, C per text; runs in loader workers."""

    tokenizer: Any
    hypotheses: list[str]
    max_length: int

    def __call__(self, texts: list):
        pairs = [(text, hypothesis) for text in texts for hypothesis in self.hypotheses]
        return tokenize(
            self.tokenizer,
            [p for p, _ in pairs],
            self.max_length,
            pairs=[h for _, h in pairs],
            truncation="only_first",
        )


@register_teacher("nli", modality="text")
class NliTeacher(Teacher):
    """Zero-shot text classification by entailment of one hypothesis per class (PyTorch only:
    C (text, hypothesis) pairs per sample through a sequence classifier)."""

    def __init__(self, request: Request, classes, numerics: Numerics):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        rest, entry = request.rest, request.entry
        tokenizer = load_hf("nli", rest, AutoTokenizer)
        model = freeze(load_hf("nli", rest, AutoModelForSequenceClassification))
        model = model.to(numerics.device)
        numerics.set_model(model)
        label2id = {k.lower(): v for k, v in (model.config.label2id or {}).items()}
        self.entailment = next((v for k, v in label2id.items() if k.startswith("entail")), None)
        if self.entailment is None:
            raise UserError(
                f"nli teacher '{rest}' has no 'entailment' label in its config "
                f"(labels: {', '.join(label2id) or 'none'}); give an NLI model"
            )
        hypotheses = [
            (classes.prompts.get(n) or [NLI_HYPOTHESIS.format(label=n)])[0] for n in classes.names
        ]
        max_length = int(entry.get("preprocess", {}).get("max_length", 256))
        super().__init__(
            request,
            classes.names,
            numerics,
            prepare=identity,
            collate=HypothesisCollate(tokenizer, hypotheses, max_length),
            model=model,
            details={"preprocess": {"max_length": max_length}, "hypotheses": hypotheses},
        )

    def forward(self, batch):
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        with self.precision.autocast():
            logits = self.model(**inputs).logits
        logits = logits.float()
        return torch.softmax(logits[:, self.entailment].view(-1, len(self.classes)), dim=-1)
