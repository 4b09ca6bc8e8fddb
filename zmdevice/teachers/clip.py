"""``clip:<arch>:<pretrained tag or checkpoint file>``: an open_clip model as a zero-shot
image classifier.

Class prompts come from templates (the paper's one, open_clip's 80, or a file) unless the
classes file gives prompts; their text embeddings are averaged per class and normalised;
softmax(logit_scale * cosine) of the image embedding against them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zmdevice.errors import UserError
from zmdevice.teachers import base
from zmdevice.teachers.base import Numerics, Request, Teacher
from zmdevice.teachers.registry import register_teacher

PAPER_TEMPLATE = "This is a photo of {label}."
"""The single CLIP template of the ZeroMatch reference code."""


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


@register_teacher("clip", modality="image")
class ClipTeacher(Teacher):
    """Zero-shot image classification by CLIP image-text similarity. Runs in PyTorch only:
    its forward is two encoders and a head, not one exportable module call."""

    def __init__(self, request: Request, classes, numerics: Numerics):
        import open_clip

        rest, templates, device = request.rest, request.templates, numerics.device
        arch, _, pretrained = rest.partition(":")
        if not pretrained:
            raise UserError(f"--teacher clip:{rest}: give clip:<arch>:<pretrained tag or file>")
        if arch not in open_clip.list_models():
            raise UserError(
                f"--teacher clip:{rest}: unknown open_clip architecture '{arch}' "
                "(see open_clip.list_models())"
            )
        weights = base.existing_path(pretrained)
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
        base.freeze(model)
        tokenizer = open_clip.get_tokenizer(arch)
        template_list = load_templates(templates)
        prompts = {
            n: list(classes.prompts.get(n) or []) or [fill_template(t, n) for t in template_list]
            for n in classes.names
        }
        with torch.inference_mode():
            per_class = [
                torch.nn.functional.normalize(
                    model.encode_text(tokenizer(prompts[n]).to(device)).float(), dim=-1
                )
                for n in classes.names
            ]
            self.weights = base.class_weights(per_class)
            self.scale = float(model.logit_scale.exp())
        numerics.set_model(model.visual)
        super().__init__(
            request,
            classes.names,
            numerics,
            prepare=preprocess,
            collate=base.stack,
            model=model,
            details={
                "preprocess": {"transform": repr(preprocess)},
                "prompts": prompts,
                "templates": templates or "paper",
                "logit_scale": self.scale,
            },
        )

    def forward(self, images):
        images = images.to(self.device)
        with self.precision.autocast():
            features = self.model.encode_image(images)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return base.zero_shot_probs(features, self.weights, self.scale)
