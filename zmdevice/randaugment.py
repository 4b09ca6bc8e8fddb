"""RandAugment drawn per image and applied to a whole batch at once (the strong image view).

FixMatch's strong view is RandAugment(2 ops, magnitude 9): each image gets two operations
drawn at random from 14. torchvision's ``v2.RandAugment`` draws one pair per call, so a
batch needs one Python-level call per image (or per group of images sharing a draw), and
on a 2-core CPU those calls cost more than the 32-px student's forward pass. Here each
round draws one operation per image, then applies every operation once, to the subset of
images that drew it: about 30 small tensor calls per batch, whatever its size.

The operations, their magnitudes and their integer rounding are torchvision's (tested
operation by operation against ``torchvision.transforms.v2.functional``): pixels stay
float32 on the 0..255 scale but are truncated to integers after each operation, as a
uint8 image would be. The geometric operations share one ``grid_sample`` (nearest, zero
fill) with one inverse affine matrix per image.

All draws come from ``generator`` (default: torch's global generator, which training
checkpoints, so a resumed run continues the same stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPERATIONS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def operation_strengths(image_size: int, magnitude: int = 9, bins: int = 31) -> dict[str, float]:
    """Unsigned strength of each operation at ``magnitude`` (of ``bins``), as torchvision's."""
    level = magnitude / (bins - 1)
    return {
        "shear_x": 0.3 * level,  # tan of the shear angle
        "shear_y": 0.3 * level,
        "translate_x": float(int(150.0 / 331.0 * image_size * level)),  # whole pixels
        "translate_y": float(int(150.0 / 331.0 * image_size * level)),
        "rotate": 30.0 * level,  # degrees
        "brightness": 0.9 * level,  # factor 1 +- strength
        "color": 0.9 * level,
        "contrast": 0.9 * level,
        "sharpness": 0.9 * level,
        "posterize": float(round(8 - magnitude / ((bins - 1) / 4))),  # bits kept
        "solarize": 255.0 * (1.0 - level),  # threshold
    }


class BatchRandAugment:
    """RandAugment(num_ops, magnitude) with an independent draw for every image of a batch."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, bins: int = 31):
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.bins = bins

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None):
        """uint8 or integer-valued float [B, 3, H, W] -> integer-valued float32 0..255."""
        images = pixels.float()
        batch = images.shape[0]
        strengths = operation_strengths(images.shape[-1], self.magnitude, self.bins)
        for _ in range(self.num_ops):
            chosen = torch.randint(len(OPERATIONS), (batch,), generator=generator)
            # Geometric and colour-factor operations go either way with equal chance.
            signs = torch.where(torch.rand(batch, generator=generator) <= 0.5, -1.0, 1.0)
            images = apply_operations(images, chosen, signs, strengths)
        return images


def apply_operations(images, chosen, signs, strengths: dict[str, float]):
    """Apply operation ``OPERATIONS[chosen[i]]`` with sign ``signs[i]`` to image i.

    Images are sorted by operation so that each operation (and the one shared warp of
    the geometric ones, which sit next to each other in ``OPERATIONS``) runs on a
    contiguous slice; one scatter puts them back in batch order.
    """
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen, minlength=len(OPERATIONS)).tolist()
    images, chosen, signs = images[order], chosen[order], signs[order]
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    first, last = OPERATIONS.index(GEOMETRIC[0]), OPERATIONS.index(GEOMETRIC[-1])
    pieces = [images[: bounds[first]]]  # identity
    rows = slice(bounds[first], bounds[last + 1])
    if rows.stop > rows.start:
        pieces.append(warp(images[rows], chosen[rows], signs[rows], strengths))
    for index in range(last + 1, len(OPERATIONS)):
        rows = slice(bounds[index], bounds[index + 1])
        if rows.stop > rows.start:
            name = OPERATIONS[index]
            factor = 1.0 + signs[rows] * strengths.get(name, 0.0)
            pieces.append(PIXEL_OPERATIONS[name](images[rows], factor, strengths))
    out = torch.empty_like(images)
    out[order] = torch.cat(pieces)
    return out


# --------------------------------------------------------------------------- geometry


def warp(images, chosen, signs, strengths: dict[str, float]):
    """One nearest-neighbour ``grid_sample`` for per-image shears, translations, rotations.

    Coordinates are pixel centres relative to the image centre. Image i is mapped forward
    by ``p_out = t + c + A (p_in - c)`` (torchvision's convention: shears about the top-left
    corner, rotations about the centre, translations by whole pixels), so each output pixel
    samples the input at ``c + A^-1 (p_out - t - c)``. Every A here has determinant 1.
    """
    count, _, height, width = images.shape
    table = torch.tensor([strengths.get(name, 0.0) for name in OPERATIONS])
    strength = (signs * table[chosen]).view(count, 1, 1)

    def only(name):
        return (chosen == OPERATIONS.index(name)).float().view(count, 1, 1)

    angle = torch.deg2rad(-strength) * only("rotate")
    cos, sin = torch.cos(angle), torch.sin(angle)
    # A = [[cos, -sin - shear_x], [sin - shear_y, cos]] (angle 0 outside rotations), det 1,
    # so A^-1 = [[cos, sin + shear_x], [-sin + shear_y, cos]].
    shear_x, shear_y = strength * only("shear_x"), strength * only("shear_y")
    sheared = only("shear_x") + only("shear_y")  # shears pivot on the top-left corner
    centre_x, centre_y = sheared * (-width / 2), sheared * (-height / 2)
    shift_x = strength * only("translate_x") + centre_x
    shift_y = strength * only("translate_y") + centre_y
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - height / 2).view(1, height, 1)
    dx, dy = xs - shift_x, ys - shift_y
    source_x = cos * dx + (sin + shear_x) * dy + centre_x
    source_y = (shear_y - sin) * dx + cos * dy + centre_y
    grid = torch.stack([source_x / (width / 2), source_y / (height / 2)], dim=-1)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- pixel values


def per_image(factor):
    return factor.view(-1, 1, 1, 1)


def blend(images, degenerate, factor):
    """``factor * images + (1 - factor) * degenerate``, clamped and truncated like uint8."""
    ratio = per_image(factor)
    return (images * ratio + degenerate * (1.0 - ratio)).clamp(0, 255).floor()


def grayscale(images):
    """Truncated luma [n, 1, H, W] (ITU-R 601-2 weights)."""
    red, green, blue = images.unbind(dim=1)
    luma = red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]
    return luma.floor().unsqueeze(1)


def brightness(images, factor, strengths):
    return (images * per_image(factor)).clamp(0, 255).floor()


def color(images, factor, strengths):
    return blend(images, grayscale(images), factor)


def contrast(images, factor, strengths):
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(images, factor, strengths):
    """Blend with a 3x3 smoothed copy (weights 1, centre 5, over 13); the border stays."""
    window = F.avg_pool2d(images, kernel_size=3, stride=1) * 9.0
    interior = images[..., 1:-1, 1:-1]
    smoothed = ((window + 4.0 * interior) / 13.0).round()
    out = images.clone()
    out[..., 1:-1, 1:-1] = interior + (1.0 - per_image(factor)) * (smoothed - interior)
    return out.clamp(0, 255).floor()


def posterize(images, factor, strengths):
    step = 2.0 ** (8 - strengths["posterize"])
    return torch.floor(images / step) * step


def solarize(images, factor, strengths):
    return torch.where(images >= strengths["solarize"], 255.0 - images, images)


def autocontrast(images, factor, strengths):
    """Stretch each channel of each image to the full 0..255 range (flat channels stay)."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255.0))  # as torchvision rounds
    low = torch.where(flat, 0.0, low)
    return ((images - low) / scale).clamp(0, 255).floor()


def equalize(images, factor, strengths):
    """Histogram equalisation per channel (torchvision's, on the uint8 values)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(images.to(torch.uint8)).float()


PIXEL_OPERATIONS = {
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "autocontrast": autocontrast,
    "equalize": equalize,
}
