"""Augmentations: clean == numpy reference, shapes, determinism, text invariants."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from zmdevice.augment import TextAugment, image_transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLS, SEP, PAD, MASK = 101, 102, 0, 103


def numpy_clean(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """Reference preprocessing the ONNX runtime implements: float32 [3, S, S]."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return array.transpose(2, 0, 1)


def random_image(seed: int, size=(37, 23), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.mark.parametrize(
    ("size", "image_size", "mode"),
    [((37, 23), 32, "RGB"), ((28, 28), 32, "L"), ((64, 64), 16, "RGB"), ((32, 32), 32, "RGB")],
)
def test_clean_equals_numpy_reference(size, image_size, mode):
    image = random_image(size[0], size, mode)
    clean = image_transforms(image_size, MEAN, STD)["clean"]
    out = clean(image)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, image_size, image_size)
    expected = numpy_clean(image, image_size, MEAN, STD)
    assert np.array_equal(out.numpy(), expected)


def test_clean_is_deterministic_without_seed():
    clean = image_transforms(32, MEAN, STD)["clean"]
    image = random_image(1)
    assert torch.equal(clean(image), clean(image))


def test_transforms_pickle_for_dataloader_workers():
    import pickle

    transforms = pickle.loads(pickle.dumps(image_transforms(16, MEAN, STD)))
    assert transforms["clean"](random_image(0)).shape == (3, 16, 16)


# ------------------------------------------------------------------ text


def sequence(n_content: int, n_pad: int = 3) -> list[int]:
    return [CLS] + list(range(1000, 1000 + n_content)) + [SEP] + [PAD] * n_pad


def test_text_augment_keeps_special_tokens_in_place_order():
    augment = TextAugment(MASK, special_ids=[CLS, SEP, PAD])
    rng = random.Random(0)
    for _ in range(200):
        ids = sequence(rng.randint(1, 20))
        out = augment(ids, rng)
        assert [t for t in out if t in (CLS, SEP, PAD)] == [CLS, SEP, PAD, PAD, PAD]
        assert out[0] == CLS and out[-4:] == [SEP, PAD, PAD, PAD]
        content = [t for t in out if t not in (CLS, SEP, PAD)]
        assert 1 <= len(content) <= len(ids) - 5
        # Every kept token is an original token or the mask.
        assert set(content) <= set(ids) | {MASK}


def test_text_augment_never_empties_the_text():
    augment = TextAugment(MASK, special_ids=[CLS, SEP, PAD], p_delete=1.0, p_mask=0.0)
    rng = random.Random(1)
    for n in (1, 2, 5):
        out = augment(sequence(n, 0), rng)
        assert len(out) == 3 and out[0] == CLS and out[-1] == SEP


def test_text_augment_probabilities_roughly_as_documented():
    augment = TextAugment(MASK, special_ids=[CLS, SEP, PAD], p_swap=0.0)
    rng = random.Random(2)
    ids = sequence(100, 0)
    lengths, masks = [], []
    for _ in range(200):
        out = augment(ids, rng)
        lengths.append(len(out) - 2)
        masks.append(sum(t == MASK for t in out) / (len(out) - 2))
    assert 0.07 < 1 - np.mean(lengths) / 100 < 0.13
    assert 0.12 < np.mean(masks) < 0.18


def test_text_augment_swap_only_swaps_neighbours():
    augment = TextAugment(MASK, special_ids=[CLS, SEP, PAD], p_delete=0, p_mask=0, p_swap=1)
    ids = sequence(6, 2)
    out = augment(ids, random.Random(3))
    diff = [i for i, (a, b) in enumerate(zip(ids, out, strict=True)) if a != b]
    assert len(diff) == 2 and diff[1] == diff[0] + 1
    assert out[diff[0]] == ids[diff[1]] and out[diff[1]] == ids[diff[0]]
    assert out[0] == CLS and out[7] == SEP


def test_text_augment_deterministic_and_leaves_input_alone():
    augment = TextAugment(MASK, special_ids=[CLS, SEP, PAD])
    ids = sequence(30)
    original = list(ids)
    first = [augment(ids, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert ids == original
    rng = random.Random(7)
    assert [augment(ids, rng) for _ in range(5)] != [augment(ids, rng) for _ in range(5)]


def test_text_augment_only_specials_and_bad_probability():
    augment = TextAugment(MASK, special_ids=[CLS, SEP])
    assert augment([CLS, SEP], random.Random(0)) == [CLS, SEP]
    with pytest.raises(ValueError, match="p_mask must be in"):
        TextAugment(MASK, [CLS], p_mask=1.5)
