"""``llm:<model>[:score]``: an instruction LM as a zero-shot text classifier.

Prompted as in the paper ("Select the topic ..."); the generated answer is mapped to a class
(exact, then prefix, then substring, case-insensitive). Unmappable answers fall back to the
class-name likelihoods and are counted in ``stats``. ``:score`` skips generation and always
uses the likelihoods. Causal and encoder-decoder (T5) models both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zmdevice.teachers.base import (
    Numerics,
    Request,
    Teacher,
    freeze,
    identity,
    load_hf,
    tokenize,
    words,
)
from zmdevice.teachers.registry import register_teacher

LLM_PROMPT = (
    "Select the topic that the given article is about. The topics are: {classes}.\n"
    "Article: {text}\nAnswer:"
)
"""The paper's prompt for instruction LMs."""


def map_answer(answer: str, classes: list[str]) -> int | None:
    """The class an LM's free-text answer names, or None.

    Tried in order, case-insensitive and ignoring punctuation: the answer equals a class;
    the answer starts with a class (longest first, so "ankle boot" beats "boot"); a class
    occurs in the answer as whole words (only when exactly one does).
    """
    text = " ".join(words(answer))
    names = [" ".join(words(name)) for name in classes]
    for i, name in enumerate(names):
        if text == name:
            return i
    by_length = sorted(range(len(names)), key=lambda i: -len(names[i]))
    for i in by_length:
        if names[i] and (text + " ").startswith(names[i] + " "):
            return i
    found = [i for i, name in enumerate(names) if name and f" {name} " in f" {text} "]
    return found[0] if len(found) == 1 else None


@dataclass
class PromptCollate:
    """Texts -> {"prompts": the filled prompts, "tokens": them tokenised, left-padded}."""

    tokenizer: Any
    listing: str
    """The class names as the prompt lists them."""
    max_length: int

    def __call__(self, texts: list):
        prompts = [LLM_PROMPT.format(classes=self.listing, text=text) for text in texts]
        return {"prompts": prompts, "tokens": tokenize(self.tokenizer, prompts, self.max_length)}


@register_teacher("llm", modality="text")
class LlmTeacher(Teacher):
    """Zero-shot text classification by a generated answer (or class-name likelihoods);
    PyTorch only (generation is a loop, not one module call)."""

    def __init__(self, request: Request, classes, numerics: Numerics):
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        rest, entry = request.rest, request.entry
        model_name, self.mode = rest, "generate"
        if rest.endswith(":score"):
            model_name, self.mode = rest[: -len(":score")], "score"
        config = load_hf("llm", model_name, AutoConfig)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        loader = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        tokenizer = load_hf("llm", model_name, AutoTokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation continues after the prompt's last token
        self.tokenizer = tokenizer
        model = freeze(load_hf("llm", model_name, loader)).to(numerics.device)
        numerics.set_model(model)
        preprocess = entry.get("preprocess", {})
        self.max_length = int(preprocess.get("max_length", 512))
        self.max_new_tokens = int(preprocess.get("max_new_tokens", 8))
        super().__init__(
            request,
            classes.names,
            numerics,
            prepare=identity,
            collate=PromptCollate(tokenizer, ", ".join(classes.names), self.max_length),
            model=model,
            details={
                "preprocess": {
                    "max_length": self.max_length,
                    "max_new_tokens": self.max_new_tokens,
                },
                "prompt": LLM_PROMPT,
                "mode": self.mode,
                "unmapped_policy": "class-name likelihoods (counted in 'answers')",
            },
            stats={"answers": 0, "mapped": 0, "unmapped": 0},
        )

    def run_model(self, **inputs):
        with self.precision.autocast():
            return self.model(**inputs)

    def score(self, prompts: list[str]):
        """Log-likelihood of each class name after each prompt -> softmax [B, C]."""
        tokenizer, names, device = self.tokenizer, self.classes, self.device
        rows = []
        for prompt in prompts:
            if self.seq2seq:
                enc = tokenizer([prompt] * len(names), return_tensors="pt").to(device)
                dec = tokenizer(names, padding=True, return_tensors="pt").to(device)
                labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
                logits = self.run_model(**enc, labels=labels).logits
                targets, mask = labels.clamp(min=0), dec.attention_mask
            else:
                prompt_ids = tokenizer(
                    prompt, truncation=True, max_length=self.max_length
                ).input_ids
                seqs = [
                    prompt_ids + tokenizer(" " + n, add_special_tokens=False).input_ids
                    for n in names
                ]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), tokenizer.pad_token_id or 0)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, seq in enumerate(seqs):
                    ids[i, : len(seq)] = torch.tensor(seq)
                    mask[i, : len(seq)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = self.run_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                targets = ids[:, 1:]
                mask = mask[:, 1:].clone()
                mask[:, : len(prompt_ids) - 1] = 0  # score only the class-name tokens
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1))
            rows.append((logp.squeeze(-1) * mask).sum(-1))
        return torch.softmax(torch.stack(rows), dim=-1)

    def forward(self, batch):
        if self.mode == "score":
            return self.score(batch["prompts"])
        tokens = {k: v.to(self.device) for k, v in batch["tokens"].items()}
        with self.precision.autocast():
            out = self.model.generate(
                **tokens,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        if not self.seq2seq:
            out = out[:, tokens["input_ids"].shape[1] :]
        answers = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        probs = torch.zeros((len(answers), len(self.classes)))
        unmapped = []
        for i, answer in enumerate(answers):
            first_line = answer.strip().splitlines()[0] if answer.strip() else ""
            choice = map_answer(first_line, self.classes)
            if choice is None:
                unmapped.append(i)
            else:
                probs[i, choice] = 1.0
        if unmapped:
            probs[unmapped] = self.score([batch["prompts"][i] for i in unmapped]).cpu()
        self.stats["answers"] += len(answers)
        self.stats["unmapped"] += len(unmapped)
        self.stats["mapped"] += len(answers) - len(unmapped)
        return probs
