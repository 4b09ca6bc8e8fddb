"""Batched RandAugment: every operation equals torchvision's, draws are per image."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from zmdevice.randaugment import OPERATIONS, BatchRandAugment, apply_operations
from zmdevice.randaugment import operation_strengths as strengths_at

SIZE = 32
NEAREST = TF.InterpolationMode.NEAREST


def torchvision_operation(image, name: str, sign: float):
    """What ``torchvision.transforms.v2.RandAugment(2, 9)`` does for one drawn operation."""
    level = 9 / 30
    if name == "shear_x":
        shear = [math.degrees(math.atan(sign * 0.3 * level)), 0.0]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, NEAREST, center=[0, 0])
    if name == "shear_y":
        shear = [0.0, math.degrees(math.atan(sign * 0.3 * level))]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, NEAREST, center=[0, 0])
    pixels = int(sign * 150.0 / 331.0 * SIZE * level)
    if name == "translate_x":
        return TF.affine(image, 0.0, [pixels, 0], 1.0, [0.0, 0.0], NEAREST)
    if name == "translate_y":
        return TF.affine(image, 0.0, [0, pixels], 1.0, [0.0, 0.0], NEAREST)
    factor = 1.0 + sign * 0.9 * level
    operations = {
        "identity": lambda: image,
        "rotate": lambda: TF.rotate(image, sign * 30.0 * level, NEAREST),
        "brightness": lambda: TF.adjust_brightness(image, factor),
        "color": lambda: TF.adjust_saturation(image, factor),
        "contrast": lambda: TF.adjust_contrast(image, factor),
        "sharpness": lambda: TF.adjust_sharpness(image, factor),
        "posterize": lambda: TF.posterize(image, 7),
        "solarize": lambda: TF.solarize(image, 255.0 * (1 - level)),
        "autocontrast": lambda: TF.autocontrast(image),
        "equalize": lambda: TF.equalize(image),
    }
    return operations[name]()


def random_images(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Smooth-ish content (upsampled noise) so geometric ops move visible structure.
    coarse = torch.randint(0, 256, (count, 3, 8, 8), generator=generator).float()
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear").to(torch.uint8)


def test_strengths_match_torchvision_bins():
    strengths = strengths_at(SIZE)
    assert strengths["posterize"] == 7  # 8 - round(9 / 7.5)
    assert strengths["translate_x"] == 4  # int(150 / 331 * 32 * 0.3)
    assert strengths["rotate"] == pytest.approx(9.0)
    assert strengths["solarize"] == pytest.approx(178.5)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_every_operation_matches_torchvision_in_a_mixed_batch(sign):
    """Each image of one batch draws a different operation; each must equal torchvision's."""
    images = random_images(2 * len(OPERATIONS))
    chosen = torch.arange(2 * len(OPERATIONS)) % len(OPERATIONS)
    chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(1))]
    signs = torch.full((len(chosen),), sign)
    ours = apply_operations(images.float(), chosen, signs, strengths_at(SIZE))
    for i, index in enumerate(chosen.tolist()):
        expected = torchvision_operation(images[i], OPERATIONS[index], sign).float()
        difference = (ours[i] - expected).abs()
        # Blends may round one unit apart (float order); geometry must be exact.
        assert difference.max() <= 1, OPERATIONS[index]
        assert (difference == 0).float().mean() >= 0.99, OPERATIONS[index]


def test_draws_are_per_image_and_follow_the_generator():
    same_image = random_images(1).repeat(64, 1, 1, 1)
    augment = BatchRandAugment()
    first = augment(same_image, torch.Generator().manual_seed(5))
    again = augment(same_image, torch.Generator().manual_seed(5))
    other = augment(same_image, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    distinct = {tuple(image.flatten().tolist()) for image in first}
    assert len(distinct) > 32  # 14 x 14 op pairs x signs: a shared draw would give 1
    assert first.dtype == torch.float32
    assert torch.equal(first, first.round()) and first.min() >= 0 and first.max() <= 255


def test_global_generator_by_default_so_checkpoints_resume_the_stream():
    images = random_images(16)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = BatchRandAugment()(images)
    torch.set_rng_state(state)
    assert torch.equal(BatchRandAugment()(images), first)
