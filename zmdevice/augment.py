"""Augmentations: the clean image view and a strong view for token ids.

Images: ``clean`` = RGB -> PIL resize to (S, S), bilinear -> float32 / 255 ->
(x - mean) / std. This is exactly what the numpy runtime does (``runtime.preprocess_image``),
so the student is trained and evaluated on the inputs it will see after export. The
training views (weak: reflect-pad S // 8, random S x S crop, horizontal flip; strong:
RandAugment(2, 9), then weak) are built batched on cached pixels in ``zmdevice.pipeline``.

Text (on cached token ids, no re-tokenising): weak = identity; strong = :class:`TextAugment`,
drawing from the ``random.Random`` passed in (the same seed gives the same views).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ResizeNormalize:
    """PIL image -> float32 tensor [3, S, S], resized bilinearly and normalised.

    Written out by hand instead of v2.ToDtype/Normalize so the arithmetic (x / 255, then
    (x - mean) / std in float32) matches the numpy runtime bit for bit.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        import torch

        self.image_size = int(image_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: Image.Image) -> Image.Image:
        """RGB PIL image of size (S, S)."""
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """Resized RGB PIL image -> normalised float32 [3, S, S]."""
        import numpy as np
        import torch

        array = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return (array.to(torch.float32) / 255.0 - self.mean) / self.std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.resize(image))


def image_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
    """The clean image view of a student (training builds its views batched: ``pipeline``).

    Args:
        image_size: S, the side of the square student input in pixels.
        mean: per-channel mean (RGB) of the normalisation, in [0, 1] units.
        std: per-channel standard deviation (RGB).

    Returns:
        ``{"clean"}``: a callable PIL image -> float32 tensor [3, S, S].
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    return {"clean": ResizeNormalize(image_size, mean, std)}


class TextAugment:
    """Strong view of a tokenised text, applied to cached token ids.

    In order, on the non-special tokens only (special ids such as [CLS], [SEP], [PAD] keep
    their order and are never deleted, masked or moved):

    1. deletion: each token is dropped with probability ``p_delete``; if that would drop
       every token, one random token survives, so the text never becomes empty;
    2. masking: each remaining token becomes ``mask_token_id`` with probability ``p_mask``;
    3. swap: with probability ``p_swap`` one random pair of neighbouring tokens (both
       non-special) trades places.

    The output is at most as long as the input (shorter by the deleted tokens); callers
    pad the batch again. Cost: a few microseconds per text, no tokenizer call.
    """

    def __init__(
        self,
        mask_token_id: int,
        special_ids: Iterable[int],
        p_delete: float = 0.1,
        p_mask: float = 0.15,
        p_swap: float = 0.5,
    ):
        for name, p in (("p_delete", p_delete), ("p_mask", p_mask), ("p_swap", p_swap)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.mask_token_id = int(mask_token_id)
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.p_delete = p_delete
        self.p_mask = p_mask
        self.p_swap = p_swap

    def __call__(self, input_ids: Sequence[int], generator: random.Random) -> list[int]:
        """Return an augmented copy of ``input_ids`` (the input is not modified)."""
        special = self.special_ids
        content = [i for i, token in enumerate(input_ids) if token not in special]
        if not content:
            return list(input_ids)
        dropped = {i for i in content if generator.random() < self.p_delete}
        if len(dropped) == len(content):
            dropped.discard(generator.choice(content))
        kept = [i for i in range(len(input_ids)) if i not in dropped]
        out = [int(input_ids[i]) for i in kept]
        # Track positions, not values: the mask id may itself be listed as special.
        movable = [input_ids[i] not in special for i in kept]
        for j, is_content in enumerate(movable):
            if is_content and generator.random() < self.p_mask:
                out[j] = self.mask_token_id
        if generator.random() < self.p_swap:
            pairs = [j for j in range(len(out) - 1) if movable[j] and movable[j + 1]]
            if pairs:
                j = generator.choice(pairs)
                out[j], out[j + 1] = out[j + 1], out[j]
        return out
