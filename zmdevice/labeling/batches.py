"""What both labeling engines share: the chunks to label (``ChunkJob``), how a sample becomes
a teacher input (``Prepared``, ``Collate``, ``iterate_batches``), the order a chunk goes
through the teacher (``labeling_order``) and back (``chunk_order``), and the finished chunk
an engine hands to the driver (``LabeledChunk``).

Neither engine nor ``run`` imports the other; both import this module.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice.errors import UserError


@dataclass(frozen=True)
class ChunkJob:
    """The chunks of one labeling run, resolved before any chunk is labeled."""

    dataset: Any
    """The opened data (``zmdevice.data``); chunks hold positions into it."""
    teacher: Any
    """The driver's teacher: it labels (local engine) or lends its preprocessing (Ray)."""
    classes: Any
    """The ``ClassList`` the teacher labels."""
    chunks: list
    """Sample positions per chunk, in data order; a chunk is ``CHUNK_BATCHES`` batches."""
    done: frozenset
    """Chunk numbers an interrupted run finished."""
    batch_size: int
    workers: int
    """Data-loading worker processes of the local engine."""
    parts_dir: Path
    with_features: bool = False
    """Keep each chunk's FM features too (for refined labels)."""

    @property
    def todo(self) -> list[int]:
        """The chunk numbers to label now, in order."""
        return [j for j in range(len(self.chunks)) if j not in self.done]


@dataclass(frozen=True)
class LabeledChunk:
    """One finished chunk, back in its own order (what its part file holds)."""

    number: int
    ids: list[str]
    probs: np.ndarray | None
    """float32 [n, C] in ``ids`` order; None when no sample was readable."""
    skipped: list[str]
    """Ids of unreadable samples (``--skip-corrupt``)."""
    stats: dict
    """The teacher's counters for this chunk alone (the LLM's answers)."""
    features: np.ndarray | None = None
    """float32 [n, D] FM features in ``ids`` order, when the job keeps them."""


def finish_chunk(job: ChunkJob, number: int, kept, probs, skipped, stats, features=None):
    """A ``LabeledChunk`` from a chunk's batches as labeled (``labeling_order``).

    Args:
        kept, skipped: sample positions, in labeling order.
        probs, features: float32 arrays of the batches that kept samples, in that order.
    """
    order, skipped_in_order = chunk_order(job.chunks[number], kept, skipped)
    ids = [job.dataset.ids[kept[o]] for o in order]
    return LabeledChunk(
        number=number,
        ids=ids,
        probs=np.concatenate(probs)[order] if kept else None,
        skipped=[job.dataset.ids[i] for i in skipped_in_order],
        stats=stats,
        features=np.concatenate(features)[order] if job.with_features else None,
    )


class Prepared:
    """torch Dataset view: index -> (index, teacher.prepare(sample)), (index, None) for a
    skipped image, or (index, the UserError) for a sample that stops the run.

    The error travels as data: raised inside a worker process, torch would re-raise it
    wrapped in a many-line "Caught ... in DataLoader worker process" message.
    """

    def __init__(self, dataset, prepare, indices):
        self.dataset, self.prepare, self.indices = dataset, prepare, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        from zmdevice.images import CorruptImage

        index = self.indices[position]
        try:
            raw = (
                self.dataset.load_image(index)
                if self.dataset.modality == "image"
                else (self.dataset.texts[index])
            )
        except CorruptImage:
            return index, None
        except UserError as error:
            return index, error
        return index, self.prepare(raw)


class Collate:
    """Drops unreadable samples and collates the rest with the teacher's collate; a batch
    with a failed sample becomes that sample's UserError."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        failed = [x for _, x in items if isinstance(x, UserError)]
        if failed:
            return failed[0]
        kept = [(i, x) for i, x in items if x is not None]
        skipped = [i for i, x in items if x is None]
        batch = self.collate([x for _, x in kept]) if kept else None
        return [i for i, _ in kept], batch, skipped


def pick_workers(requested: int | None, teacher) -> int:
    """Worker processes: as asked, else up to 4 leaving a core to the model for images and
    none for text.

    Tokenising a batch takes about 1% of even MiniLM's forward pass, so a text worker only
    adds its start-up and competes with the model for the cores; decoding and resizing
    images is real work that overlaps the forward pass. Every teacher's ``prepare`` and
    ``collate`` pickle, so workers also start where processes are spawned (macOS, Windows).
    """
    default = 0 if teacher.modality == "text" else min(4, max((os.cpu_count() or 1) - 1, 0))
    return requested if requested is not None else default


def iterate_batches(dataset, teacher, indices, batch_size: int, workers: int, features=False):
    """Yield (indices kept, probabilities float32 [b, C] numpy, indices skipped) per batch;
    with ``features``, a fourth item: the FM features float32 [b, D] from the same pass."""
    import torch

    loader = torch.utils.data.DataLoader(
        Prepared(dataset, teacher.prepare, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=Collate(teacher.collate),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        # Page-locked batches copy to a GPU without a staging copy (and asynchronously).
        pin_memory=getattr(teacher.device, "type", None) == "cuda",
    )
    for item in loader:
        if isinstance(item, UserError):
            raise item
        kept, batch, skipped = item
        if features:
            with torch.inference_mode():
                batch_features, probs = teacher.features_and_probs(batch)
            yield kept, probs.float().cpu().numpy(), skipped, batch_features.float().cpu().numpy()
            continue
        probs = teacher.predict_proba(batch).numpy() if kept else np.zeros((0, 0), np.float32)
        yield kept, probs, skipped


def labeling_order(dataset, chunk, teacher) -> list[int]:
    """The order a chunk's samples go through the teacher: texts shortest first in the
    teacher's own tokens (``Teacher.input_lengths``), so that a batch pads its texts to
    similar lengths (a batch is padded to its longest text); images as they come.

    On 2,000 WordNet noun definitions at batch 64, in chunks of 1,024, the teacher computes
    1.20x the real tokens sorted by tokens, 1.51x sorted by characters, and more in data
    order: MiniLM's matrix products dominate its pass, so the tokens are its time. Chunks
    are labeled whole, so a batch never mixes two chunks, and ``finish_chunk`` puts each
    part back in order.
    """
    if dataset.modality != "text":
        return list(chunk)
    positions = list(chunk)
    lengths = teacher.input_lengths([dataset.texts[index] for index in positions])
    order = sorted(range(len(positions)), key=lengths.__getitem__)
    return [positions[k] for k in order]


def chunk_order(chunk, kept: list[int], skipped: list[int]) -> tuple[np.ndarray, list[int]]:
    """Put a chunk labeled in ``labeling_order`` back in its own order: the permutation of
    ``kept`` (sample indices, in labeling order) and ``skipped`` sorted, both by position in
    the chunk. A part file keeps its chunk's order, whatever order it was labeled in."""
    position = {index: p for p, index in enumerate(chunk)}
    order = np.argsort([position[i] for i in kept], kind="stable")
    return order, sorted(skipped, key=position.get)


def chunk_progress(job: ChunkJob):
    """A progress bar over all samples, starting at those the finished chunks hold."""
    from tqdm import tqdm

    chunks = job.chunks
    return tqdm(
        total=sum(len(c) for c in chunks),
        initial=sum(len(chunks[j]) for j in job.done if j < len(chunks)),
        unit=job.dataset.modality,
        desc=f"label {job.parts_dir.name[1 : -len('.parts')]}",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,  # a bar on a terminal; none in logs, where it would print every update
    )
