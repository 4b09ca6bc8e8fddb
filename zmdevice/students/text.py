"""Text students: DistilBERT (random tiny presets, a DistilBERT folder, or a BERT-layout
folder such as MiniLM converted by ``weights.distilbert_from_bert``) and tokenisation.

Features are DistilBERT's last hidden states, dropout 0.1, mean-pooled over the attention
mask; the main and KD heads are both Linear(D, D) -> GELU -> Linear(D, C), the classifier of
USB's BERT student. The tokenizer is a ``tokenizers.Tokenizer`` saved as ``tokenizer.json``,
so training and the runtime tokenise identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from zmdevice.errors import UserError
from zmdevice.students.base import TOKENIZER_FILE, Student
from zmdevice.students.registry import register_student
from zmdevice.students.weights import distilbert_from_bert, resolve_model_source

if TYPE_CHECKING:
    from tokenizers import Tokenizer


TEXT_DROPOUT = 0.1


@register_student("distilbert")
class TextStudent(Student):
    """DistilBERT student. Inputs: ``input_ids``, ``attention_mask`` int64 [B, L]."""

    modality = "text"

    def __init__(self, config: dict, encoder: nn.Module, tokenizer: Tokenizer):
        super().__init__(config)
        dim = int(config["architecture"]["feature_dim"])
        self.encoder = encoder
        self.dropout = nn.Dropout(TEXT_DROPOUT)
        self.head = mlp_head(dim, len(config["classes"]))
        self.tokenizer = tokenizer

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask-aware mean of the last hidden states [B, D] of tokens [B, L]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = self.dropout(hidden)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-padding row (never produced by encode_texts) gives zeros, not NaN
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Main-head logits [B, C] of tokens [B, L]."""
        return self.head(self.features(input_ids, attention_mask))

    @classmethod
    def from_config(cls, config: dict, model_dir: Path) -> TextStudent:
        """The student ``config`` describes (random init) with the tokenizer file of
        ``model_dir``."""
        tokenizer_path = model_dir / config["preprocess"].get("tokenizer", TOKENIZER_FILE)
        if not tokenizer_path.is_file():
            raise UserError(f"{model_dir} is a text student without its {tokenizer_path.name}")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        encoder = distilbert_from_architecture(config["architecture"])
        return cls(config, encoder, tokenizer)

    @classmethod
    def from_preset(
        cls, preset: str, entry: dict, weights: str, classes: list[str], settings: dict
    ) -> TextStudent:
        """``weights``: "" (random, for the presets with the built-in tiny tokenizer), a
        DistilBERT or BERT-layout model folder, or a hub id."""
        from transformers import DistilBertConfig, DistilBertModel

        if not weights:
            # Random init from the catalog's architecture (tiny presets).
            spec = dict(entry.get("architecture", {}))
            if entry.get("tokenizer") != "builtin-tiny":
                raise UserError(
                    f"catalog entry '{preset}' needs weights or tokenizer='builtin-tiny'"
                )
            tokenizer = tiny_tokenizer()
            spec.setdefault("vocab_size", tokenizer.get_vocab_size())
            spec.setdefault("pad_token_id", tokenizer.token_to_id("[PAD]"))
            encoder = DistilBertModel(DistilBertConfig(**spec))
        else:
            source = resolve_model_source(weights)
            model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get(
                "model_type"
            )
            if model_type not in ("bert", "distilbert"):
                raise UserError(
                    f"{weights}: model_type '{model_type}' is neither DistilBERT nor BERT; "
                    "the distilbert student needs one of those"
                )
            try:
                if model_type == "bert":
                    encoder = distilbert_from_bert(source)
                else:
                    encoder = DistilBertModel.from_pretrained(str(source))
                tokenizer = _load_tokenizer_from_dir(source)
            except (OSError, ValueError, KeyError) as error:
                raise UserError(
                    f"cannot load DistilBERT from '{weights}' ({str(error).splitlines()[0]}); "
                    "check that the folder holds a complete model"
                ) from None
        max_length = int(settings.get("max_length", 40))
        limit = encoder.config.max_position_embeddings
        if not 2 < max_length <= limit:
            raise UserError(f"student max_length must be between 3 and {limit}, got {max_length}")
        config = {
            "student": preset,
            "modality": "text",
            "classes": classes,
            "architecture": _distilbert_architecture(encoder.config),
            "preprocess": _tokenizer_settings(tokenizer, max_length),
        }
        return cls(config, encoder, tokenizer)

    def _new_kd_head(self) -> nn.Module:
        return mlp_head(self.feature_dim, len(self.classes))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def freeze_word_embeddings(self) -> None:
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)

    @property
    def max_length(self) -> int:
        """Longest token sequence fed to the encoder ([CLS] and [SEP] included)."""
        return int(self.config["preprocess"]["max_length"])

    @property
    def pad_token_id(self) -> int:
        return int(self.config["preprocess"]["pad_token_id"])

    @property
    def mask_token_id(self) -> int:
        return int(self.config["preprocess"]["mask_token_id"])

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that text augmentation must leave alone ([CLS], [SEP], [PAD], ...)."""
        return list(self.config["preprocess"]["special_token_ids"])

    def encode_texts(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch: truncated to ``max_length``, padded to the longest.

        Returns:
            input_ids, attention_mask: int64 [B, L], L <= max_length.
        """
        ids = encode_token_ids(self.tokenizer, texts, max_length or self.max_length)
        return pad_token_ids(ids, self.pad_token_id)


def mlp_head(dim: int, num_classes: int):
    """Linear(D, D) -> GELU -> Linear(D, C), the text classifier of USB's BERT student."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))


def encode_token_ids(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text with [CLS]/[SEP], truncated to ``max_length`` (no padding)."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]


def pad_token_ids(ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one.

    Returns:
        input_ids, attention_mask: int64 [B, L] (mask 1 on real tokens, 0 on padding).
    """
    length = max((len(row) for row in ids), default=1)
    input_ids = torch.full((len(ids), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


# A small English word list for the tiny test tokenizer. Letters and "##" letters make
# every lowercase ASCII word tokenisable without [UNK]; the words keep common ones whole.


_TINY_WORD_TEXT = """
the a an of and or to in on at for with from by is are was be this that it as not no
what which who animal plant food person location place artifact object body substance
dog cat bird fish tree flower fruit bread water city river country man woman child
tool car house shirt shoe bag coat dress trouser sandal sneaker boot pullover
good bad great terrible love hate happy sad small large red green blue black white
one two three drug pain side effect review helped worked day week time made used
any some part kind type form group something someone
"""


_TINY_WORDS = _TINY_WORD_TEXT.split()


_TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_tokenizer() -> Tokenizer:
    """A ~200-token uncased WordPiece tokenizer built in code (tests, no files needed)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punctuation = list(".,;:!?'\"()-/&%$")
    vocab_list = list(_TINY_SPECIALS) + list(chars) + [f"##{c}" for c in chars] + punctuation
    vocab_list += [w for w in dict.fromkeys(_TINY_WORDS) if w not in vocab_list]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _tokenizer_settings(tokenizer: Tokenizer, max_length: int) -> dict:
    """The text part of ``config.json``'s ``preprocess`` for this tokenizer."""
    vocab = tokenizer.get_vocab()
    specials = [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    for token in ("[PAD]", "[MASK]"):
        if token not in vocab:
            raise UserError(f"the student's tokenizer has no {token} token: use a BERT-style vocab")
    return {
        "max_length": int(max_length),
        "tokenizer": TOKENIZER_FILE,
        "pad_token_id": vocab["[PAD]"],
        "mask_token_id": vocab["[MASK]"],
        "special_token_ids": specials,
    }


def _load_tokenizer_from_dir(model_dir: Path) -> Tokenizer:
    """The fast tokenizer of a model folder: its tokenizer.json, else transformers'."""
    from tokenizers import Tokenizer

    if (model_dir / TOKENIZER_FILE).is_file():
        return Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    # Not DistilBertTokenizerFast(vocab_file=...): in transformers 5.x that silently yields
    # an empty vocabulary (every word -> [UNK]); AutoTokenizer reads the folder properly.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer


def _distilbert_architecture(hf_config) -> dict:
    """The architecture part of config.json from a transformers DistilBertConfig."""
    return {
        "family": "distilbert",
        "vocab_size": hf_config.vocab_size,
        "dim": hf_config.dim,
        "n_layers": hf_config.n_layers,
        "n_heads": hf_config.n_heads,
        "hidden_dim": hf_config.hidden_dim,
        "max_position_embeddings": hf_config.max_position_embeddings,
        "activation": hf_config.activation,
        "pad_token_id": hf_config.pad_token_id,
        "dropout": hf_config.dropout,
        "attention_dropout": hf_config.attention_dropout,
        "sinusoidal_pos_embds": bool(hf_config.sinusoidal_pos_embds),
        "feature_dim": hf_config.dim,
    }


# DistilBertConfig fields that config.json records (enough to rebuild the encoder).


_DISTILBERT_KEYS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "hidden_dim",
    "max_position_embeddings",
    "activation",
    "pad_token_id",
    "dropout",
    "attention_dropout",
    "sinusoidal_pos_embds",
)


def distilbert_from_architecture(architecture: dict):
    """A randomly initialised DistilBertModel of the given architecture."""
    from transformers import DistilBertConfig, DistilBertModel

    keys = _DISTILBERT_KEYS
    hf_config = DistilBertConfig(**{k: architecture[k] for k in keys if k in architecture})
    return DistilBertModel(hf_config)
