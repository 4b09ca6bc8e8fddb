"""The labeling engines behind one small interface (``labeling.run.make_engine`` picks one).

An engine only predicts: it labels the chunks of a ``ChunkJob`` and yields each finished
``LabeledChunk``; the driver (``labeling.run``) writes every part file, so both engines
write the same files and either resumes the other's parts. Each engine's module is
imported only when that engine is chosen (Ray's only with ``--engine ray``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from zmdevice.labeling.batches import ChunkJob, LabeledChunk


class Engine(Protocol):
    """What ``run_label`` asks of an engine."""

    driver_device: str
    """Where the driver's teacher runs (``--device``; the CPU when Ray actors label)."""

    def check(self) -> None:
        """Fail in one line before anything is written (a missing extra, a dead cluster)."""

    def where(self, device) -> str:
        """What the summary says the samples were labeled on."""

    def label_chunks(self, job: ChunkJob) -> Iterator[LabeledChunk]:
        """Label ``job.todo``; yield each chunk, back in its own order, once it is whole."""
