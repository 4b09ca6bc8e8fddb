"""Foundation-model teachers: frozen zero-shot classifiers behind one small interface.

A :class:`Teacher` owns its preprocessing, split so the heavy part can run in data-loader
workers: ``prepare(item)`` turns one raw sample (a ``str`` or an RGB ``PIL.Image``) into what
``collate(items)`` stacks into a batch, and ``predict_proba(batch)`` returns float32 [B, C]
class probabilities on the CPU. Teachers are built frozen, in eval mode, gradients off.

Kinds (``build_teacher`` specs; catalog names in ``models/*.toml`` resolve to these):

- ``clip:<arch>:<pretrained tag or checkpoint file>``: open_clip; class prompts from
  templates, averaged and normalised text embeddings; softmax(logit_scale * cosine).
- ``text-embed:<model dir or hub id>``: mean-pooled, L2-normalised sentence embeddings of
  the text against the class descriptions; softmax(scale * cosine), scale 100 like CLIP's.
- ``nli:<model>``: each class as the hypothesis "This example is {label}."; the entailment
  logits of the C hypotheses, softmaxed over classes.
- ``llm:<model>[:score]``: an instruction LM prompted as in the paper ("Select the topic
  ..."); the generated answer is mapped to a class (exact, then prefix, then substring,
  case-insensitive). Unmappable answers fall back to the class-name likelihoods and are
  counted. ``:score`` skips generation and always uses the likelihoods.
- ``imagenet:<timm model>[:<weights file>]``: an ImageNet-1k classifier whose classes are
  mapped to the target classes (an explicit map file, else by name similarity); a target
  class gets the summed probability of its ImageNet classes, renormalised.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice import catalog
from zmdevice.errors import UserError

KINDS = ("clip", "text-embed", "nli", "llm", "imagenet")
PAPER_TEMPLATE = "This is a photo of {label}."
"""The single CLIP template of the ZeroMatch reference code."""
TEXT_EMBED_TEMPLATE = "{label}"
"""Class text for sentence encoders when the classes file gives no description."""
TEXT_EMBED_SCALE = 100.0
"""Logit scale (inverse temperature) on cosine similarities, as CLIP's learned 100."""
NLI_HYPOTHESIS = "This example is {label}."
LLM_PROMPT = (
    "Select the topic that the given article is about. The topics are: {classes}.\n"
    "Article: {text}\nAnswer:"
)
"""The paper's prompt for instruction LMs."""


@dataclass
class Teacher:
    """A frozen zero-shot classifier; see the module docstring for the contract.

    Attributes:
        spec: resolved ``kind:spec`` string.
        modality: "text" or "image".
        classes: target class names, index = class id.
        prepare: picklable callable, one raw sample -> a prepared item (runs in workers).
        collate: picklable callable, list of prepared items -> a batch.
        forward: batch -> float32 [B, C] probabilities (torch tensor on the CPU).
        info: what the pseudo-label metadata records (kind, preprocessing, prompts, ...).
        stats: running counters a teacher reports (e.g. the LLM's unmapped answers).
        device: the torch device it runs on.
        model: the frozen ``torch.nn.Module`` (eval mode, no gradients).
        features_and_probs: batch -> (features [B, D], probabilities [B, C]) from one pass,
            for teachers with a feature space (text-embed, imagenet); None otherwise.
            ``zmdevice.fewshot`` adapts such a teacher with a few labeled examples.
    """

    spec: str
    modality: str
    classes: list[str]
    prepare: Callable[[Any], Any]
    collate: Callable[[list], Any]
    forward: Callable[[Any], Any]
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    device: Any = None
    model: Any = None
    features_and_probs: Callable[[Any], tuple] | None = None

    def predict_proba(self, batch) -> Any:
        """float32 [B, C] class probabilities (CPU torch tensor) for a collated batch."""
        import torch

        with torch.inference_mode():
            return self.forward(batch).float().cpu()

    def predict_items(self, items: Sequence) -> Any:
        """Convenience: prepare, collate and predict raw samples in this process."""
        return self.predict_proba(self.collate([self.prepare(item) for item in items]))


# ----------------------------------------------------------------------------- resolving


def resolve_spec(spec: str) -> tuple[str, str, dict]:
    """Map a catalog name or ``kind:spec`` to (kind, rest, catalog entry or {}).

    Raises:
        UserError: neither a known kind nor a catalog teacher (lists the choices).
    """
    kind, _, rest = spec.partition(":")
    if kind in KINDS and rest:
        return kind, rest, {}
    # A catalog name may carry imagenet options: efficientnet-lite0:size=224.
    name, *options = spec.split(":")
    entry = catalog.find_entry(name, "teacher")
    if entry is None:
        names = ", ".join(sorted(catalog.list_entries("teacher"))) or "(none)"
        raise UserError(
            f"unknown --teacher '{spec}': use a catalog name ({names}) or kind:spec with kind "
            f"one of {', '.join(KINDS)} (e.g. clip:ViT-B-32:openai)"
        )
    kind, _, rest = entry["spec"].partition(":")
    source = entry.get("weights_from")
    if source:
        rest = rest.replace("{weights}", str(catalog_weights(f"--teacher {name}", source)))
    if options:
        if kind != "imagenet" or not all("=" in option for option in options):
            raise UserError(
                f"--teacher {spec}: only imagenet teachers take options (size=N, map=FILE)"
            )
        rest = ":".join([rest, *options])
    return kind, rest, entry


def teacher_modality(spec: str) -> str:
    """The modality a teacher labels ("image" or "text"), from its spec alone."""
    kind = resolve_spec(spec)[0]
    return "image" if kind in ("clip", "imagenet") else "text"


def catalog_weights(flag: str, source: dict) -> Path:
    """Locate a catalog model's weights provided by a pip package (``weights_from``).

    ``flag`` names the model in the error, e.g. "--teacher efficientnet-lite0".
    """
    import importlib

    module_name, _, attribute = source["function"].rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(
            f"{flag} needs the package '{source['package']}': "
            f"pip install {source['package']} (or zmdevice[offline-models])"
        ) from None
    target: Any = module
    for part in attribute.split("/"):
        target = getattr(target, part)
    return Path(target())


def build_teacher(
    spec: str,
    classes,
    *,
    device: Any = "cpu",
    templates: str | None = None,
    precision: str = "fp32",
    runtime: str = "torch",
) -> Teacher:
    """Build a frozen teacher for ``classes`` (a ``zmdevice.data.ClassList``).

    Args:
        spec: catalog name (``minilm``, ``efficientnet-lite0``) or ``kind:spec``.
        classes: the target classes with optional per-class prompts.
        device: torch device (or its name) the model runs on.
        templates: CLIP templates: None/"paper", "openai", or a file with one per line.
        precision: auto, fp32, bf16 or fp16 (``zmdevice.precision``); class weights and
            probabilities are computed in fp32 whatever the network runs in.
        runtime: auto, torch or onnx (``zmdevice.precision.choose_runtime``).

    Raises:
        UserError: unknown teacher, missing weights, unusable model, a precision or
            runtime this teacher or device cannot use.
    """
    import torch

    from zmdevice.precision import check_precision, choose_runtime

    kind, rest, entry = resolve_spec(spec)
    device = torch.device(device)
    numerics = _Numerics(
        check_precision(precision), choose_runtime(runtime, device.type, kind, precision), device
    )
    builders = {
        "clip": _build_clip,
        "text-embed": _build_text_embed,
        "nli": _build_nli,
        "llm": _build_llm,
        "imagenet": _build_imagenet,
    }
    teacher = builders[kind](rest, classes, numerics, entry, templates)
    teacher.spec = f"{kind}:{rest}"
    teacher.info = {
        "name": spec,
        "kind": kind,
        "spec": teacher.spec,
        "catalog": {k: v for k, v in entry.items() if k != "weights_from"} or None,
        **teacher.info,
        **numerics.info(),
    }
    teacher.device = device
    return teacher


def _freeze(model):
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@dataclass
class _Numerics:
    """How a teacher's network runs: precision (autocast) and runtime (torch or onnx).

    The builders route the network call, and nothing else, through :meth:`network` or
    :meth:`autocast`: prompt embeddings, class weights and the zero-shot head stay fp32.
    """

    request: str
    """--precision as asked (``auto`` resolved per model by ``set_model``)."""
    runtime: str
    """"torch" or "onnx", already resolved."""
    device: Any
    precision: Any = None
    """The resolved ``zmdevice.precision.Precision`` once the model is known."""

    def set_model(self, model) -> None:
        from zmdevice.precision import Hardware, model_family, teacher_precision

        hardware = Hardware.probe(self.device)
        self.precision = teacher_precision(
            self.request, self.runtime, hardware, model_family(model)
        )

    def autocast(self, function):
        """``function`` run under the chosen precision's autocast."""
        precision = self.precision

        def run(*args, **kwargs):
            with precision.autocast():
                return function(*args, **kwargs)

        return run

    def network(self, module, example: tuple, names: list[str], dynamic: dict, identity):
        """``module`` (tensors in, one float tensor out) as it will run: under autocast with
        a float32 result, or as its cached ONNX export. ``identity`` = (spec, weights path,
        dict of whatever else shapes the graph) keys the ONNX cache."""
        self.set_model(module)
        if self.runtime == "onnx":
            from zmdevice.onnx_teacher import cache_key, onnx_module

            onnx = onnx_module(module, example, names, dynamic, cache_key(*identity))
            return lambda *inputs: onnx(*inputs).to(self.device)
        run = self.autocast(module)
        return lambda *inputs: run(*(x.to(self.device) for x in inputs)).float()

    def info(self) -> dict:
        return {
            "precision": self.precision.name,
            "precision_reason": self.precision.reason,
            "runtime": self.runtime,
        }


def _existing_path(value: str) -> Path | None:
    """``value`` as a local path when it looks like one (exists, or has a separator)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if "/" in value and (value.startswith((".", "/", "~")) or value.endswith((".pt", ".pth"))):
        raise UserError(f"teacher weights not found: {value}")
    return None


def class_texts(classes, template: str) -> dict[str, list[str]]:
    """Per class: the user's prompts/descriptions if any, else ``template`` with the name."""
    return {
        name: list(classes.prompts.get(name) or []) or [template.format(label=name)]
        for name in classes.names
    }


# ----------------------------------------------------------------------------- text


@dataclass
class _TokenizeCollate:
    """Collate texts (or text pairs) into padded token tensors; runs in loader workers."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list):
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )


def _identity(item):
    return item


def _load_hf(kind: str, name: str, loader, **kwargs):
    """``loader.from_pretrained(name)`` with a one-line error instead of a hub traceback."""
    path = _existing_path(name)
    try:
        return loader.from_pretrained(str(path) if path else name, **kwargs)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load the {kind} teacher '{name}': {first[:200]} (give a local model "
            "folder, or a hub id with network access)"
        ) from None


def mean_pool(hidden, mask):
    """Mean of token states [B, L, D] over the attention mask [B, L] -> [B, D]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentence_encoder(model):
    """(input_ids, attention_mask) -> L2-normalised mean-pooled embeddings [B, D], pooling
    in fp32 whatever precision the transformer ran in (bf16 sums over tokens lose digits)."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
            pooled = mean_pool(hidden.last_hidden_state.float(), attention_mask)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEncoder().eval()


def _build_text_embed(name, classes, numerics, entry, templates) -> Teacher:
    import torch
    from transformers import AutoModel, AutoTokenizer

    preprocess = entry.get("preprocess", {})
    max_length = int(preprocess.get("max_length", 128))
    scale = float(preprocess.get("scale", TEXT_EMBED_SCALE))
    tokenizer = _load_hf("text-embed", name, AutoTokenizer)
    model = _freeze(_load_hf("text-embed", name, AutoModel)).to(numerics.device)
    encoder = sentence_encoder(model)
    texts = class_texts(classes, preprocess.get("template", TEXT_EMBED_TEMPLATE))
    collate = _TokenizeCollate(tokenizer, max_length)

    def fp32_embed(batch):
        return encoder(*(batch[k].to(numerics.device) for k in ("input_ids", "attention_mask")))

    # Class weights from the fp32 PyTorch encoder, whatever runs the data: a few texts, and
    # every sample is compared with them.
    with torch.inference_mode():
        weights = class_weights([fp32_embed(collate(texts[n])) for n in classes.names])
    example = collate([t for n in classes.names for t in texts[n]] + ["a", "b c"])
    names = ["input_ids", "attention_mask"]
    network = numerics.network(
        encoder,
        tuple(example[k] for k in names),
        names,
        {k: {0: "batch", 1: "sequence"} for k in names},
        (f"text-embed:{name}", _existing_path(name), {"max_length": max_length}),
    )

    def features_and_probs(batch):
        features = network(batch["input_ids"], batch["attention_mask"])
        return features, zero_shot_probs(features, weights, scale)

    def forward(batch):
        return zero_shot_probs(network(batch["input_ids"], batch["attention_mask"]), weights, scale)

    return Teacher(
        spec="",
        modality="text",
        classes=list(classes.names),
        prepare=_identity,
        collate=collate,
        forward=forward,
        model=model,
        info={"preprocess": {"max_length": max_length, "scale": scale}, "prompts": texts},
        features_and_probs=features_and_probs,
    )


def class_weights(per_class: list) -> Any:
    """Zero-shot classifier weights [C, D] from per-class prompt embeddings.

    Args:
        per_class: C tensors [P_c, D], each row one prompt's L2-normalised embedding.

    Returns:
        [C, D]: each class's mean prompt embedding, L2-normalised again (CLIP's recipe).
    """
    import torch

    means = torch.stack([embeddings.mean(0) for embeddings in per_class])
    return torch.nn.functional.normalize(means, dim=-1)


def zero_shot_probs(features, weights, scale: float):
    """softmax(scale * cosine): features [B, D] and weights [C, D] L2-normalised -> [B, C]."""
    return (scale * features @ weights.T).softmax(dim=-1)


def _build_nli(name, classes, numerics, entry, templates) -> Teacher:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = _load_hf("nli", name, AutoTokenizer)
    device = numerics.device
    model = _freeze(_load_hf("nli", name, AutoModelForSequenceClassification)).to(device)
    numerics.set_model(model)
    run_model = numerics.autocast(model)
    label2id = {k.lower(): v for k, v in (model.config.label2id or {}).items()}
    entail = next((v for k, v in label2id.items() if k.startswith("entail")), None)
    if entail is None:
        raise UserError(
            f"nli teacher '{name}' has no 'entailment' label in its config "
            f"(labels: {', '.join(label2id) or 'none'}); give an NLI model"
        )
    hypotheses = [
        (classes.prompts.get(n) or [NLI_HYPOTHESIS.format(label=n)])[0] for n in classes.names
    ]
    max_length = int(entry.get("preprocess", {}).get("max_length", 256))
    num_classes = len(hypotheses)

    def collate(texts):
        pairs = [(text, hypothesis) for text in texts for hypothesis in hypotheses]
        return tokenizer(
            [p for p, _ in pairs],
            [h for _, h in pairs],
            padding=True,
            truncation="only_first",
            max_length=max_length,
            return_tensors="pt",
        )

    def forward(batch):
        logits = run_model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        return torch.softmax(logits[:, entail].view(-1, num_classes), dim=-1)

    return Teacher(
        spec="",
        modality="text",
        classes=list(classes.names),
        prepare=_identity,
        collate=collate,
        forward=forward,
        model=model,
        info={"preprocess": {"max_length": max_length}, "hypotheses": hypotheses},
    )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def map_answer(answer: str, classes: list[str]) -> int | None:
    """The class an LM's free-text answer names, or None.

    Tried in order, case-insensitive and ignoring punctuation: the answer equals a class;
    the answer starts with a class (longest first, so "ankle boot" beats "boot"); a class
    occurs in the answer as whole words (only when exactly one does).
    """
    text = " ".join(_words(answer))
    names = [" ".join(_words(name)) for name in classes]
    for i, name in enumerate(names):
        if text == name:
            return i
    by_length = sorted(range(len(names)), key=lambda i: -len(names[i]))
    for i in by_length:
        if names[i] and (text + " ").startswith(names[i] + " "):
            return i
    found = [i for i, name in enumerate(names) if name and f" {name} " in f" {text} "]
    return found[0] if len(found) == 1 else None


def _build_llm(rest, classes, numerics, entry, templates) -> Teacher:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name, mode = rest, "generate"
    if rest.endswith(":score"):
        name, mode = rest[: -len(":score")], "score"
    config = _load_hf("llm", name, AutoConfig)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    tokenizer = _load_hf("llm", name, AutoTokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues after the prompt's last token
    device = numerics.device
    model = _freeze(_load_hf("llm", name, loader)).to(device)
    numerics.set_model(model)
    run_model, generate = numerics.autocast(model), numerics.autocast(model.generate)
    names = list(classes.names)
    listing = ", ".join(names)
    preprocess = entry.get("preprocess", {})
    max_length = int(preprocess.get("max_length", 512))
    max_new_tokens = int(preprocess.get("max_new_tokens", 8))
    stats = {"answers": 0, "mapped": 0, "unmapped": 0}

    def collate(texts):
        prompts = [LLM_PROMPT.format(classes=listing, text=text) for text in texts]
        return {
            "prompts": prompts,
            "tokens": tokenizer(
                prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ),
        }

    def score(prompts: list[str]):
        """Log-likelihood of each class name after each prompt -> softmax [B, C]."""
        rows = []
        for prompt in prompts:
            if seq2seq:
                enc = tokenizer([prompt] * len(names), return_tensors="pt").to(device)
                dec = tokenizer(names, padding=True, return_tensors="pt").to(device)
                labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
                logits = run_model(**enc, labels=labels).logits
                targets, mask = labels.clamp(min=0), dec.attention_mask
            else:
                prompt_ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
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
                logits = run_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                targets = ids[:, 1:]
                mask = mask[:, 1:].clone()
                mask[:, : len(prompt_ids) - 1] = 0  # score only the class-name tokens
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1))
            rows.append((logp.squeeze(-1) * mask).sum(-1))
        return torch.softmax(torch.stack(rows), dim=-1)

    def forward(batch):
        if mode == "score":
            return score(batch["prompts"])
        tokens = {k: v.to(device) for k, v in batch["tokens"].items()}
        out = generate(
            **tokens,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        if not seq2seq:
            out = out[:, tokens["input_ids"].shape[1] :]
        answers = tokenizer.batch_decode(out, skip_special_tokens=True)
        probs = torch.zeros((len(answers), len(names)))
        unmapped = []
        for i, answer in enumerate(answers):
            choice = map_answer(answer.strip().splitlines()[0] if answer.strip() else "", names)
            if choice is None:
                unmapped.append(i)
            else:
                probs[i, choice] = 1.0
        if unmapped:
            probs[unmapped] = score([batch["prompts"][i] for i in unmapped]).cpu()
        stats["answers"] += len(answers)
        stats["unmapped"] += len(unmapped)
        stats["mapped"] += len(answers) - len(unmapped)
        return probs

    return Teacher(
        spec="",
        modality="text",
        classes=names,
        prepare=_identity,
        collate=collate,
        forward=forward,
        model=model,
        info={
            "preprocess": {"max_length": max_length, "max_new_tokens": max_new_tokens},
            "prompt": LLM_PROMPT,
            "mode": mode,
            "unmapped_policy": "class-name likelihoods (counted in 'answers')",
        },
        stats=stats,
    )


# ----------------------------------------------------------------------------- images


def load_templates(templates: str | None) -> list:
    """CLIP templates: None/'paper' -> the paper's one; 'openai' -> open_clip's 80; a file.

    File: one template per line with ``{label}`` (or ``{}``) where the class name goes.
    """
    if templates in (None, "paper"):
        return [PAPER_TEMPLATE]
    if templates == "openai":
        import open_clip

        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    path = Path(templates)
    if not path.is_file():
        raise UserError(f"--templates {templates}: use paper, openai, or an existing file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("#")]
    bad = [ln for ln in lines if "{label}" not in ln and "{}" not in ln]
    if not lines or bad:
        raise UserError(
            f"--templates {path}: every line needs {{label}} where the class name goes"
            + (f" (not: {bad[0]!r})" if bad else " (the file is empty)")
        )
    return lines


def fill_template(template, label: str) -> str:
    """A template string (``{label}`` or ``{}``) or open_clip callable applied to a name."""
    if callable(template):
        return template(label)
    return template.replace("{label}", label).replace("{}", label)


def _build_clip(rest, classes, numerics, entry, templates) -> Teacher:
    import open_clip
    import torch

    device = numerics.device

    arch, _, pretrained = rest.partition(":")
    if not pretrained:
        raise UserError(f"--teacher clip:{rest}: give clip:<arch>:<pretrained tag or file>")
    if arch not in open_clip.list_models():
        raise UserError(
            f"--teacher clip:{rest}: unknown open_clip architecture '{arch}' "
            "(see open_clip.list_models())"
        )
    weights = _existing_path(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(weights) if weights else pretrained, device=device
        )
    except Exception as error:  # missing download, bad checkpoint: many exception types
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UserError(
            f"cannot load CLIP weights '{pretrained}' for {arch}: {type(error).__name__} "
            f"{first} (without network, give a local checkpoint file)"
        ) from None
    _freeze(model)
    tokenizer = open_clip.get_tokenizer(arch)
    template_list = load_templates(templates)
    prompts = {
        name: list(classes.prompts.get(name) or [])
        or [fill_template(t, name) for t in template_list]
        for name in classes.names
    }
    with torch.inference_mode():
        per_class = [
            torch.nn.functional.normalize(
                model.encode_text(tokenizer(prompts[n]).to(device)).float(), dim=-1
            )
            for n in classes.names
        ]
        weights_matrix = class_weights(per_class)
        scale = float(model.logit_scale.exp())

    numerics.set_model(model.visual)
    encode_image = numerics.autocast(model.encode_image)

    def forward(images):
        features = encode_image(images.to(device)).float()
        return zero_shot_probs(
            torch.nn.functional.normalize(features, dim=-1), weights_matrix, scale
        )

    return Teacher(
        spec="",
        modality="image",
        classes=list(classes.names),
        prepare=preprocess,
        collate=_stack,
        forward=forward,
        model=model,
        info={
            "preprocess": {"transform": repr(preprocess)},
            "prompts": prompts,
            "templates": templates or "paper",
            "logit_scale": scale,
        },
    )


def _stack(items):
    import torch

    return torch.stack(items)


# ImageNet classes ------------------------------------------------------------------


def imagenet_class_names() -> list[list[str]]:
    """The 1,000 ImageNet-1k classes, each as its list of synonyms (timm's offline copy)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [
        [s.strip() for s in info.index_to_description(i).split(",") if s.strip()]
        for i in range(info.num_classes())
    ]


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _norm_words(text: str) -> list[str]:
    return [_singular(w) for w in _words(text)]


def name_similarity(target: str, synonym: str) -> float:
    """Lexical similarity of a target class name/description and an ImageNet synonym.

    1.0 same words; 0.8 same head noun (last word: "ankle boot" ~ "cowboy boot"); 0.6 the
    head noun of one is a word of the other; 0.4 one's head noun is inside a word of the
    other ("shirt" in "sweatshirt"); else 0.
    """
    a, b = _norm_words(target), _norm_words(synonym)
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    if a[-1] == b[-1]:
        return 0.8
    if a[-1] in b or b[-1] in a:
        return 0.6
    if len(a[-1]) > 3 and any(a[-1] in w for w in b):
        return 0.4
    return 0.0


def similarity_map(classes, imagenet: list[list[str]], min_score: float = 0.6) -> np.ndarray:
    """float32 [1000, C]: ImageNet class i feeds target class c when they match by name.

    Each target class is matched through its name and its descriptions (article words
    such as "a"/"an"/"pair of" are ignored by using head nouns). Each ImageNet class goes to
    the target class with the best score >= ``min_score`` (ties share it).

    Raises:
        UserError: a target class matches no ImageNet class (give a map file).
    """
    names = list(classes.names)
    matrix = np.zeros((len(imagenet), len(names)), dtype=np.float32)
    for i, synonyms in enumerate(imagenet):
        scores = np.array(
            [
                max(
                    name_similarity(text, synonym)
                    for text in [name, *(classes.prompts.get(name) or [])]
                    for synonym in synonyms
                )
                for name in names
            ]
        )
        best = scores.max()
        if best >= min_score:
            matrix[i, scores == best] = 1.0
    empty = [names[c] for c in range(len(names)) if matrix[:, c].sum() == 0]
    if empty:
        raise UserError(
            f"no ImageNet class matches the class(es) {', '.join(empty[:5])} by name: give a "
            "map file (imagenet:<model>:<weights>:map=FILE, TOML class = [ImageNet names])"
        )
    return matrix


def read_class_map(path: Path, classes, imagenet: list[list[str]]) -> np.ndarray:
    """float32 [1000, C] from a TOML/JSON map: target class -> list of ImageNet names/indices.

    Raises:
        UserError: unreadable file, unknown target class, unknown ImageNet name, or a
            target class without any entry.
    """
    if not path.is_file():
        raise UserError(f"class map file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        table = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"class map {path} is not valid TOML/JSON: {error}") from None
    table = table.get("map", table)
    lookup = {}
    for i, synonyms in enumerate(imagenet):
        for synonym in synonyms:
            lookup.setdefault(synonym.lower(), i)
    names = list(classes.names)
    matrix = np.zeros((len(imagenet), len(names)), dtype=np.float32)
    for target, sources in table.items():
        if target not in names:
            raise UserError(f"class map {path}: '{target}' is not one of the classes")
        for source in sources if isinstance(sources, list) else [sources]:
            index = source if isinstance(source, int) else lookup.get(str(source).lower())
            if index is None or not 0 <= index < len(imagenet):
                raise UserError(f"class map {path}: '{source}' is not an ImageNet class name")
            matrix[index, names.index(target)] = 1.0
    empty = [n for c, n in enumerate(names) if matrix[:, c].sum() == 0]
    if empty:
        raise UserError(f"class map {path} gives no ImageNet class for {', '.join(empty[:5])}")
    return matrix


def find_shipped_map(classes, entry: dict) -> Path | None:
    """A map file of the catalog entry whose classes are exactly these (any order)."""
    for relative in entry.get("maps", []):
        path = catalog.catalog_dir() / relative
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            table = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
            if set(table.get("map", table)) == set(classes.names):
                return path
    return None


def load_weights_in_order(model, path: Path) -> None:
    """Load a state dict by key, or, when the keys differ but the tensor shapes match one
    to one in order (as with the offline EfficientNet-Lite0 ``.pth``), by position.

    Raises:
        UserError: unreadable file or shapes that fit neither way.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise UserError(f"cannot read weights file {path}: {str(error)[:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return
    src = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst) or any(v.shape != own[k].shape for v, k in zip(src, dst, strict=True)):
        raise UserError(
            f"weights file {path} does not fit this model (neither its names nor its "
            f"{len(src)} tensor shapes match the model's {len(dst)})"
        )
    model.load_state_dict(dict(zip(dst, src, strict=True)), strict=False)


@dataclass
class _ImageTransform:
    """Resize to size x size (bilinear) -> [0, 1] tensor -> normalise; runs in workers."""

    size: int
    mean: tuple
    std: tuple

    def __call__(self, image):
        import torch
        from PIL import Image

        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std


def _build_imagenet(rest, classes, numerics, entry, templates) -> Teacher:
    import timm
    import torch

    device = numerics.device

    parts = rest.split(":")
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    parts = [p for p in parts if "=" not in p]
    name = parts[0]
    weights = Path(parts[1]).expanduser() if len(parts) > 1 and parts[1] else None
    if name not in timm.list_models():
        raise UserError(f"--teacher imagenet:{rest}: '{name}' is not a timm model name")
    if weights is not None and not weights.is_file():
        raise UserError(f"teacher weights not found: {weights}")
    try:
        model = timm.create_model(name, pretrained=weights is None, num_classes=1000)
    except Exception as error:  # the hub download failed (offline, unknown tag, ...)
        raise UserError(
            f"cannot get ImageNet weights for '{name}' ({type(error).__name__}); give a "
            f"weights file: imagenet:{name}:/path/to/weights.pth"
        ) from None
    if weights is not None:
        load_weights_in_order(model, weights)
    _freeze(model).to(device)
    preprocess = entry.get("preprocess", {})
    config = model.pretrained_cfg or {}
    size = int(
        options.get("size", preprocess.get("image_size", config.get("input_size", [3, 224])[-1]))
    )
    mean = tuple(preprocess.get("mean", config.get("mean", (0.485, 0.456, 0.406))))
    std = tuple(preprocess.get("std", config.get("std", (0.229, 0.224, 0.225))))
    imagenet = imagenet_class_names()
    map_path = Path(options["map"]) if "map" in options else find_shipped_map(classes, entry)
    if map_path is not None:
        matrix = read_class_map(map_path, classes, imagenet)
    else:
        matrix = similarity_map(classes, imagenet)
    mapping = torch.from_numpy(matrix).to(device)
    network = numerics.network(
        model,
        (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),),
        ["pixel_values"],
        {"pixel_values": {0: "batch"}},
        (f"imagenet:{name}", weights, {"size": size}),
    )

    def features_and_probs(images):
        features = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        probs = model.get_classifier()(features).float().softmax(-1) @ mapping
        return features, probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)

    def forward(images):
        probs = network(images).softmax(-1) @ mapping
        return probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)

    return Teacher(
        spec="",
        modality="image",
        classes=list(classes.names),
        prepare=_ImageTransform(size, mean, std),
        collate=_stack,
        forward=forward,
        model=model,
        info={
            "preprocess": {
                "image_size": size,
                "mean": list(mean),
                "std": list(std),
                "resize": "bilinear",
            },
            "class_map": str(map_path) if map_path else "name similarity",
            "mapped": {
                n: [imagenet[i][0] for i in np.flatnonzero(matrix[:, c])][:50]
                for c, n in enumerate(classes.names)
            },
        },
        features_and_probs=features_and_probs,
    )
