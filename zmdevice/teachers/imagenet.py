"""``imagenet:<timm model>[:<weights file>][:size=N][:map=FILE]``: an ImageNet-1k
classifier as a zero-shot image classifier.

Its 1,000 classes are mapped to the target classes (an explicit map file, a map shipped with
the catalog entry for these classes, else by name similarity); a target class gets the
summed probability of its ImageNet classes, renormalised. Its pre-logits vector is the
feature space ``zmdevice.fewshot`` adapts in.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import torch

from zmdevice import catalog
from zmdevice.augment import ResizeNormalize
from zmdevice.errors import UserError
from zmdevice.teachers.base import Numerics, Request, Teacher, freeze, stack, words
from zmdevice.teachers.registry import register_teacher


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
    return [_singular(w) for w in words(text)]


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


# No int8: dynamic int8 suits transformers; a convolutional net would need calibration images.
@register_teacher("imagenet", modality="image", exports_onnx=True, has_features=True)
class ImagenetTeacher(Teacher):
    """Zero-shot image classification through an ImageNet classifier's mapped classes."""

    def __init__(self, request: Request, classes, numerics: Numerics):
        import timm

        rest, entry = request.rest, request.entry
        device = numerics.device
        parts = rest.split(":")
        options = dict(p.split("=", 1) for p in parts if "=" in p)
        parts = [p for p in parts if "=" not in p]
        model_name = parts[0]
        weights = Path(parts[1]).expanduser() if len(parts) > 1 and parts[1] else None
        if model_name not in timm.list_models():
            raise UserError(f"--teacher imagenet:{rest}: '{model_name}' is not a timm model name")
        if weights is not None and not weights.is_file():
            raise UserError(f"teacher weights not found: {weights}")
        try:
            model = timm.create_model(model_name, pretrained=weights is None, num_classes=1000)
        except Exception as error:  # the hub download failed (offline, unknown tag, ...)
            raise UserError(
                f"cannot get ImageNet weights for '{model_name}' ({type(error).__name__}); "
                f"give a weights file: imagenet:{model_name}:/path/to/weights.pth"
            ) from None
        if weights is not None:
            load_weights_in_order(model, weights)
        freeze(model).to(device)
        preprocess = entry.get("preprocess", {})
        config = model.pretrained_cfg or {}
        default_size = preprocess.get("image_size", config.get("input_size", [3, 224])[-1])
        size = int(options.get("size", default_size))
        mean = tuple(preprocess.get("mean", config.get("mean", (0.485, 0.456, 0.406))))
        std = tuple(preprocess.get("std", config.get("std", (0.229, 0.224, 0.225))))
        imagenet = imagenet_class_names()
        map_path = Path(options["map"]) if "map" in options else find_shipped_map(classes, entry)
        if map_path is not None:
            matrix = read_class_map(map_path, classes, imagenet)
        else:
            matrix = similarity_map(classes, imagenet)
        self.mapping = torch.from_numpy(matrix).to(device)
        self.network = numerics.network(
            model,
            (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),),
            ["pixel_values"],
            {"pixel_values": {0: "batch"}},
            (f"imagenet:{model_name}", weights, {"size": size}),
        )
        super().__init__(
            request,
            classes.names,
            numerics,
            prepare=ResizeNormalize(size, mean, std),
            collate=stack,
            model=model,
            details={
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
        )

    def target_probs(self, imagenet_probs):
        """ImageNet probabilities [B, 1000] -> target class probabilities [B, C]."""
        probs = imagenet_probs @ self.mapping
        return probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)

    def features_and_probs(self, images):
        """(pre-logits features [B, D], target probabilities [B, C]) in PyTorch fp32."""
        model = self.model
        trunk = model.forward_features(images.to(self.device))
        features = model.forward_head(trunk, pre_logits=True)
        return features, self.target_probs(model.get_classifier()(features).float().softmax(-1))

    def forward(self, images):
        return self.target_probs(self.network(images).softmax(-1))
