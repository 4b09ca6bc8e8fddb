"""The in-memory training pipeline: cached inputs, resumable samplers, batched augmentation.

On a 2-core CPU the data pipeline must stay well below the cost of the student's forward
and backward pass (issue 4's target: a stage-2 step <= 1.15x the bare forward+backward).
So each sample is decoded and tokenised once, before training:

- images are resized once to the student's size and kept as one uint8 tensor
  [N, 3, S, S] (3 KB per 32 px image); the weak view (reflect-pad S/8, random crop,
  horizontal flip) is applied to the whole batch as tensor ops, and the strong view is
  RandAugment(2, 9) drawn per image and applied batch-wide
  (``zmdevice.randaugment.BatchRandAugment``), then the weak view;
- texts are tokenised once to id lists; the strong view edits the cached ids
  (``zmdevice.augment.TextAugment``) and batches are padded to their longest member.

The clean view is ``zmdevice.augment``'s (``image_transforms``) on the cached pixels; weak
and strong exist only here, on batched tensors. All randomness comes from torch's global
generator (augmentation) and each sampler's own generator (data order), so a checkpoint
that stores those states resumes the exact stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Sampler:
    """Endless shuffled batches of indices into ``range(n)``; its state is checkpointable.

    Batches run through one random permutation after another, so every sample is seen
    once per epoch and a batch larger than ``n`` wraps into the next permutation.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        import torch

        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next(self):
        """[batch_size] int64 indices."""
        import torch

        parts = []
        needed = self.batch_size
        while needed > 0:
            if self.position == self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
                self.position = 0
            take = min(needed, self.n - self.position)
            parts.append(self.order[self.position : self.position + take])
            self.position += take
            needed -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = state["position"]


# --------------------------------------------------------------------------- images


def cache_images(dataset, image_size: int, progress: bool = False, spill_dir=None,
                 memory_budget: int = 2**30):  # fmt: skip
    """Decode every image of ``dataset`` once, resized (bilinear) to a uint8 tensor.

    The resize is the ``clean`` transform's (PIL bilinear to S x S), so the cached pixels
    are exactly what the exported model sees after preprocessing. A cache larger than
    ``memory_budget`` bytes goes to a memory-mapped file in ``spill_dir`` (when given)
    instead of RAM, so a large or high-resolution data set trains in bounded memory: the
    OS pages it in and out. The file is unlinked as soon as it is mapped, so nothing is
    left on disk once the process ends, however it ends.

    Returns:
        uint8 [N, 3, S, S].
    """
    import os
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    shape = (len(dataset), 3, image_size, image_size)
    if spill_dir is not None and int(np.prod(shape)) > memory_budget:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".image-cache-", dir=spill_dir)
        os.close(handle)
        out = np.memmap(name, dtype=np.uint8, mode="w+", shape=shape)
        os.unlink(name)
    else:
        out = np.empty(shape, dtype=np.uint8)
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"decode {dataset.source.name}", leave=False)
    for i in indices:
        image = dataset.load_image(i)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        out[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)


@dataclass
class ImageViews:
    """Clean, weak and strong views of cached uint8 images as normalised float batches."""

    pixels: Any
    """uint8 [N, 3, S, S] cache."""
    mean: tuple[float, float, float]
    """Per-channel normalisation mean (0..1 scale)."""
    std: tuple[float, float, float]
    """Per-channel normalisation std."""

    def __post_init__(self):
        import torch

        from zmdevice.randaugment import BatchRandAugment

        self.rand_augment = BatchRandAugment(num_ops=2, magnitude=9)
        self.mean_tensor = torch.tensor(self.mean).view(1, 3, 1, 1)
        self.std_tensor = torch.tensor(self.std).view(1, 3, 1, 1)

    def normalise(self, pixels):
        """0..255 (uint8 or float) [B, 3, S, S] -> normalised float32: (x/255 - mean) / std.

        The same arithmetic as the exported model's preprocessing, so clean views match it.
        """
        return (pixels.float() / 255.0 - self.mean_tensor) / self.std_tensor

    def batch(self, groups: list[tuple[str, Any]]) -> dict:
        """Concatenate (view, indices) groups into one model input.

        Views: ``clean`` (as cached), ``weak`` (reflect-pad S/8, random S x S crop, random
        horizontal flip) and ``strong`` (RandAugment(2, 9) drawn per image, then weak).
        Augmented groups share one pad-crop-flip over the whole batch (fewer small tensor
        calls per step); the draws are still per image. Clean views (evaluation) are batched
        on their own.
        """
        import torch

        views = {view for view, _ in groups}
        if "clean" in views and len(views) > 1:
            raise ValueError("clean views are batched on their own, not with augmented ones")
        pixels = torch.cat([self._pixels(view, indices) for view, indices in groups])
        if "clean" not in views:
            pixels = weak_augment(pixels)
        return {"pixel_values": self.normalise(pixels)}

    def _pixels(self, view: str, indices):
        """Cached pixels of ``indices`` as 0..255 float, RandAugmented for the strong view."""
        if view not in ("clean", "weak", "strong"):
            raise ValueError(f"unknown image view {view!r}")
        if view == "strong":
            return self.rand_augment(self.pixels[indices])
        return self.pixels[indices].float()


def weak_augment(images):
    """Batched weak view on float images [B, 3, S, S] (any scale): reflect-pad S/8, crop, flip."""
    import torch
    import torch.nn.functional as F

    batch, _, size, _ = images.shape
    pad = max(size // 8, 1)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    # One gather per batch: row/column offsets per image select an S x S window.
    dy = torch.randint(0, 2 * pad + 1, (batch,))
    dx = torch.randint(0, 2 * pad + 1, (batch,))
    flip = torch.rand(batch) < 0.5
    arange = torch.arange(size)
    rows = (dy[:, None] + arange[None, :]).view(batch, 1, size, 1)
    cols = dx[:, None] + arange[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(batch, 1, 1, size)
    channels = images.shape[1]
    rows = rows.expand(batch, channels, size, padded.shape[3])
    picked = padded.gather(2, rows)
    return picked.gather(3, cols.expand(batch, channels, size, size))


# --------------------------------------------------------------------------- texts


@dataclass
class TextViews:
    """Weak (as is) and strong (token edits) views of cached token ids, padded per batch."""

    token_ids: list[list[int]]
    """Token ids per sample, with special tokens, without padding."""
    pad_token_id: int
    """Id used to pad a batch to its longest sample."""
    augment: Any = None
    """``zmdevice.augment.TextAugment`` (needed for strong views)."""
    rng: random.Random | None = None
    """Generator of the text augmentation (its state goes into checkpoints)."""

    def ids(self, view: str, indices) -> list[list[int]]:
        samples = [self.token_ids[i] for i in indices.tolist()]
        if view == "strong":
            return [self.augment(ids, self.rng) for ids in samples]
        return samples

    def batch(self, groups: list[tuple[str, Any]]) -> dict:
        """Concatenate (view, indices) groups into one padded ``input_ids``/``attention_mask``."""
        import torch

        samples = [ids for view, idx in groups for ids in self.ids(view, idx)]
        length = max(len(ids) for ids in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, ids in enumerate(samples):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
