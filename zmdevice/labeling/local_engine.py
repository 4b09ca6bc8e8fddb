"""The local engine: this process labels the chunks through one torch ``DataLoader`` (the
teacher's own ``prepare``/``collate`` in worker processes, the teacher batch by batch)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from zmdevice.labeling.batches import (
    ChunkJob,
    LabeledChunk,
    chunk_progress,
    finish_chunk,
    iterate_batches,
    labeling_order,
)


@dataclass(frozen=True)
class LocalEngine:
    """Label in this process, on ``device`` (``--device``)."""

    device: str = "auto"

    @property
    def driver_device(self) -> str:
        """Where the driver's teacher runs: here it is the one that labels."""
        return self.device

    def check(self) -> None:
        """Nothing to reach before labeling."""

    def where(self, device) -> str:
        """What the summary says the samples were labeled on."""
        return str(device)

    def label_chunks(self, job: ChunkJob) -> Iterator[LabeledChunk]:
        """Label the chunks of ``job.todo``; yield each as soon as it is whole.

        Chunks are whole batches (except the very last), so batches never straddle two
        chunks; each chunk goes through the teacher in ``labeling_order``.
        """
        teacher, todo = job.teacher, job.todo
        remaining = [i for j in todo for i in labeling_order(job.dataset, job.chunks[j], teacher)]
        current = iter(todo)
        number = next(current, None)
        kept_all: list[int] = []
        probs_all: list[np.ndarray] = []
        features_all: list[np.ndarray] = []
        skipped_all: list[int] = []
        stats_before = dict(teacher.stats)
        batches = iterate_batches(
            job.dataset, teacher, remaining, job.batch_size, job.workers, job.with_features
        )
        progress = chunk_progress(job)
        try:
            for kept, probs, skipped, *features in batches:
                kept_all += kept
                skipped_all += skipped
                if kept:
                    probs_all.append(probs)
                    features_all += features
                progress.update(len(kept) + len(skipped))
                if len(kept_all) + len(skipped_all) == len(job.chunks[number]):
                    # Only this chunk's share of the teacher's counters goes into its part.
                    stats = {k: v - stats_before.get(k, 0) for k, v in teacher.stats.items()}
                    stats_before = dict(teacher.stats)
                    yield finish_chunk(
                        job, number, kept_all, probs_all, skipped_all, stats, features_all
                    )
                    kept_all, probs_all, features_all, skipped_all = [], [], [], []
                    number = next(current, None)
        finally:
            progress.close()
