"""Tiny randomly initialised teacher models saved to folders, for offline tests."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "sports",
    "politics",
    "science",
    "the",
    "a",
    "game",
    "team",
    "vote",
    "law",
    "atom",
    "cell",
    "ball",
    "match",
    "election",
    "experiment",
    "is",
    "about",
    "this",
    "example",
    "article",
    "topic",
    "topics",
    "select",
    "given",
    "answer",
]


def save_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer over WORDS with BERT-style specials, saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[EOS]",
    )
    fast.save_pretrained(folder)


def bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=6 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        **extra,
    )


def make_text_embed(folder: Path) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    save_tokenizer(folder)
    BertModel(bert_config()).save_pretrained(folder)
    return folder


def make_nli(folder: Path, entail_name: str = "entailment") -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    save_tokenizer(folder)
    labels = {0: "contradiction", 1: "neutral", 2: entail_name}
    config = bert_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def make_llm(folder: Path, favourite: str) -> Path:
    """A tiny GPT-2 whose every next token is ``favourite`` (by construction).

    The final layer norm outputs the constant ``bias`` = 10 x the word's embedding, so the
    tied output layer scores that word highest at every position.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    save_tokenizer(folder)
    config = GPT2Config(
        vocab_size=6 + len(WORDS),
        n_positions=256,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=5,
        eos_token_id=5,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    token = 6 + WORDS.index(favourite)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[token])
    model.save_pretrained(folder)
    return folder


CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path) -> str:
    """Register the open_clip architecture 'zm-tiny-clip' from a JSON config file."""
    import open_clip

    path = folder / "zm-tiny-clip.json"
    path.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(path)
    return "zm-tiny-clip"


def make_clip_checkpoint(folder: Path) -> Path:
    """A randomly initialised tiny CLIP's state dict saved as a .pt checkpoint."""
    import open_clip
    import torch

    register_tiny_clip(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("zm-tiny-clip", pretrained=None)
    path = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def make_seq2seq(folder: Path) -> Path:
    """A tiny randomly initialised T5 (encoder-decoder) with the WordLevel tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    save_tokenizer(folder)
    config = T5Config(
        vocab_size=6 + len(WORDS),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=5,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def make_imagenet(folder: Path, classes: list[str]) -> str:
    """The rest of an ``imagenet:`` spec (after the kind) for timm's tiny
    ``test_efficientnet`` with random weights and a map file sending ImageNet classes
    0, 1, 2, ... to ``classes`` in order; 32 px inputs."""
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet").state_dict(), folder / "w.pth")
    lines = ["[map]"] + [f"{name} = [{i}]" for i, name in enumerate(classes)]
    (folder / "map.toml").write_text("\n".join(lines) + "\n")
    return f"test_efficientnet:{folder / 'w.pth'}:map={folder / 'map.toml'}:size=32"


TINY_KINDS = {
    "clip": lambda folder, classes: f"zm-tiny-clip:{make_clip_checkpoint(folder)}",
    "text-embed": lambda folder, classes: str(make_text_embed(folder)),
    "nli": lambda folder, classes: str(make_nli(folder)),
    "llm": lambda folder, classes: str(make_llm(folder, favourite=classes[0])),
    "imagenet": lambda folder, classes: make_imagenet(folder, classes),
}
"""Teacher kind -> (an empty folder, class names) -> the rest of a spec of that kind on a
tiny random model saved in the folder, offline (the class names must be words of ``WORDS``). A new
teacher kind needs an entry: ``tests/test_teachers.py`` walks the registry and builds each."""


def tiny_teacher_spec(kind: str, root: Path, classes: list[str]) -> str:
    """``kind:rest`` of a tiny offline teacher of ``kind`` saved under ``root/kind``."""
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return f"{kind}:{TINY_KINDS[kind](folder, classes)}"
