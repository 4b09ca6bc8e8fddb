"""Make the embedded default data sets in this folder (committed, so no Debian package is needed).

A small, seeded extract of what ``examples/build_datasets.py`` builds from the Debian
sources (Fashion-MNIST images, WordNet noun definitions), small enough to live in git
(about 1.5 MB):

    images/  2,000 unlabeled, 4 labeled per class (from the pool), 500 test  (28x28 PNG)
    text/    2,000 unlabeled, 4 labeled per class (from the pool), 400 test  (CSV)

Rerun (needs ``apt-get install dataset-fashion-mnist wordnet-base``)::

    python examples/default/make_default.py

The same sources and flags give byte-identical files. Licences: see LICENSES.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_datasets import build_images, build_text  # noqa: E402

SEED = 0
LABELS_PER_CLASS = 4
SIZES = {"images": (2000, 500), "text": (2000, 400)}
"""Data set -> (unlabeled pool size, test size)."""


def main() -> None:
    unlabeled, test = SIZES["images"]
    sizes = build_images(
        HERE / "images",
        labels_per_class=LABELS_PER_CLASS,
        seed=SEED,
        max_unlabeled=unlabeled,
        max_test=test,
    )
    print(f"images: {sizes}")
    unlabeled, test = SIZES["text"]
    sizes = build_text(
        HERE / "text",
        labels_per_class=LABELS_PER_CLASS,
        seed=SEED,
        max_unlabeled=unlabeled,
        max_test=test,
    )
    print(f"text: {sizes}")


if __name__ == "__main__":
    main()
