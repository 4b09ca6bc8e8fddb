"""``--gold``: labeled data whose true labels measure the teacher (the quality report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zmdevice.errors import UserError
from zmdevice.labeling.batches import iterate_batches


@dataclass(frozen=True)
class Gold:
    """The gold samples and their true classes."""

    path: Path
    dataset: Any
    truth: np.ndarray
    """int [G] class ids."""

    @classmethod
    def open(cls, path: Path, data_options, classes) -> Gold:
        """Open ``path`` (labels required) and map its labels to ``classes``' ids."""
        from zmdevice.data import label_indices, open_dataset

        dataset = open_dataset(path, data_options, require_labels=True)
        return cls(path, dataset, label_indices(dataset, classes))

    def report(self, teacher, names, batch_size: int, workers: int, known: dict):
        """The teacher's accuracy on the gold samples: (report dict, summary lines).

        Gold samples whose id was just labeled (``known``: id -> class, e.g. ``--gold``
        naming the labeled data itself or a gold copy of it) reuse that pseudo-label: the
        file is id-keyed, so the same id is the same sample, and running the teacher on them
        twice would double the cost. Only the others go through the teacher.
        """
        from zmdevice.metrics import classification_report, format_report

        gold = self.dataset
        predicted = np.full(len(gold), -1, dtype=np.int64)
        for i, sample_id in enumerate(gold.ids):
            predicted[i] = known.get(sample_id, -1)
        unseen = [i for i in range(len(gold)) if predicted[i] < 0]
        for kept, probs, _ in iterate_batches(gold, teacher, unseen, batch_size, workers):
            if len(kept):
                predicted[np.asarray(kept)] = probs.argmax(1)
        keep = np.flatnonzero(predicted >= 0)
        if not len(keep):
            raise UserError(f"--gold {self.path}: no readable samples to measure the teacher on")
        report = classification_report(self.truth[keep], predicted[keep], names)
        report["gold"] = str(self.path)
        return report, format_report(report, names, f"teacher on gold labels ({self.path})")
