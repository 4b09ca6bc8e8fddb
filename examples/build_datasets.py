"""Build the three benchmark data sets from offline sources into zmdevice's formats.

Sources (the first two are Debian packages, installed by .ci/run):
  - Fashion-MNIST, ``apt-get install dataset-fashion-mnist``: idx files in
    /usr/share/datasets/fashion-mnist (60k train + 10k test, 28x28 grey, MIT licence).
  - WordNet 3.0, ``apt-get install wordnet-base``: /usr/share/wordnet/data.noun; each noun
    synset's definition is a text, its lexicographer file (8 categories) the label.
  - scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``, in the
    ``bench`` extra): 1,797 images of 8x8 pixels with 17 grey levels, 10 classes.

Output (``--out DIR``, default ``data/``)::

    DIR/images/unlabeled/train-00042.png         unlabeled pool (a flat image folder)
    DIR/images/labeled/<class>/train-00042.png   K per class, drawn from the pool
    DIR/images/dev/<class>/train-00123.png       dev split: train images outside the pool
    DIR/images/test/<class>/test-00007.png       test split (from the 10k test set)
    DIR/images/unlabeled_gold.csv                id,path,label: true labels of the pool
    DIR/images/classes.toml                      class -> description
    DIR/text/unlabeled.csv                       id,text (the pool; ids = WordNet offsets)
    DIR/text/unlabeled_gold.csv                  id,text,label: the pool with true labels
    DIR/text/labeled.csv                         id,text,label: K per class from the pool
    DIR/text/dev.csv                             id,text,label: disjoint from pool and test
    DIR/text/test.csv                            id,text,label: disjoint from the pool
    DIR/text/classes.toml                        class -> description for zero-shot
    DIR/digits/...                               as DIR/images/ (file names digit-00042.png)
    DIR/*/BUILD.json                             how the folder was built

Labeled examples are also in the unlabeled pool (as in the paper), with the same content;
for text they keep the same id. The dev split is for choosing settings (test is only for
final tables): it shares no example with the pool (hence none with the labeled set) nor
with test. It is drawn from what the pool leaves, by its own random stream, so adding it
left the pool, labeled and test files of earlier builds unchanged; only when the pool would
take every example are the dev examples taken out of it. The digits are few (1,797), so
their splits are small: test 497, dev 300, pool the remaining 1,000 by default. Everything
is drawn with ``--seed``: the same flags give byte-identical files. Usage::

    python examples/build_datasets.py --out data --labels-per-class 4 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import random
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")

FASHION_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
"""Fashion-MNIST label i -> class name (also the folder name, so no '/' as in 'T-shirt/top')."""

FASHION_DESCRIPTIONS = {
    "t-shirt": "a t-shirt or top",
    "trouser": "a pair of trousers",
    "pullover": "a pullover sweater",
    "dress": "a dress",
    "coat": "a coat",
    "sandal": "a sandal",
    "shirt": "a shirt",
    "sneaker": "a sneaker",
    "bag": "a bag",
    "ankle-boot": "an ankle boot",
}

WORDNET_CATEGORIES = {
    "05": "animal",
    "20": "plant",
    "13": "food",
    "18": "person",
    "15": "location",
    "06": "artifact",
    "08": "body",
    "27": "substance",
}
"""WordNet lexicographer file number (field 2 of data.noun) -> class name."""

WORDNET_DESCRIPTIONS = {
    "animal": "an animal, a living creature such as a mammal, bird, fish, reptile or insect",
    "plant": "a plant, such as a tree, shrub, herb, flower, grass, moss or fungus",
    "food": "food or drink, something people eat or drink such as a dish, fruit or beverage",
    "person": "a person, a human being described by role, occupation, origin or character",
    "location": "a location, a place or region such as a city, country, area or point",
    "artifact": "an artifact, a man-made object such as a tool, device, building or garment",
    "body": "a part of the body, such as an organ, bone, muscle, tissue or limb",
    "substance": "a substance, a material or chemical such as a compound, mineral or liquid",
}


DIGIT_DESCRIPTIONS = {
    "zero": "a handwritten digit zero, round like a ring",
    "one": "a handwritten digit one, straight like a pole",
    "two": "a handwritten digit two, curved like a swan",
    "three": "a handwritten digit three, curled like a worm",
    "four": "a handwritten digit four, angled like a folding chair",
    "five": "a handwritten digit five, bent like a hook",
    "six": "a handwritten digit six, coiled like a snail",
    "seven": "a handwritten digit seven, angled like a crane",
    "eight": "a handwritten digit eight, pinched like an hourglass",
    "nine": "a handwritten digit nine, a loop on a stick like a lollipop",
}
"""Digit i -> class name (folder name) -> description. An ImageNet FM knows no digits: its
name-similarity class map needs an ImageNet noun per class, so each description ends on an
object of a similar shape. The resulting teacher is deliberately weak (a transfer check)."""

DIGITS_TEST, DIGITS_DEV = 497, 300
"""Default split sizes of the digits; the pool takes the remaining 1,000."""


class BuildError(Exception):
    """Bad source files or flags: printed on one line, exit code 2."""


# --------------------------------------------------------------------------- sources


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file of unsigned bytes.

    Returns:
        uint8 array of the stored shape: [N] labels or [N, H, W] images.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise BuildError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise BuildError(f"{path} holds {body.size} bytes but its header says {shape}")
    return body.reshape(shape)


FASHION_FILES = [
    f"{prefix}-{kind}-idx{dims}-ubyte.gz"
    for prefix in ("train", "t10k")
    for kind, dims in (("images", 3), ("labels", 1))
]


def _require_fashion(folder: Path) -> None:
    for name in FASHION_FILES:
        if not (folder / name).is_file():
            raise BuildError(
                f"{folder / name} not found: apt-get install dataset-fashion-mnist, "
                "or point --fashion-dir at the idx files"
            )


def _require_wordnet(path: Path) -> None:
    if not path.is_file():
        raise BuildError(
            f"{path} not found: apt-get install wordnet-base, or point --wordnet-file at "
            "WordNet's data.noun"
        )


def load_fashion(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST splits: ``{"train": (images [N, 28, 28], labels [N]), "test": ...}``."""
    _require_fashion(folder)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or len(images) != len(labels):
            raise BuildError(f"{images_path} and {labels_path} do not match")
        splits[split] = (images, labels)
    return splits


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``(images uint8 [N, 8, 8] in 0..255, labels int [N])``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise BuildError(
            "the digits need scikit-learn: pip install 'zmdevice[bench]' (or scikit-learn)"
        ) from None
    bunch = sklearn_digits()
    return scale_digits(bunch.images), np.asarray(bunch.target)


def scale_digits(images: np.ndarray) -> np.ndarray:
    """The digits' 17 grey levels (0..16) spread over 0..255 (16 -> 255), as uint8."""
    return np.rint(np.asarray(images, dtype=np.float64) * (255 / 16)).astype(np.uint8)


def definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: everything before the first quoted example."""
    text = gloss.strip()
    if text.startswith('"'):
        return ""  # examples only, no definition
    # Examples follow '; "' (a few use ': "'); quotes inside a definition stay.
    match = re.search(r'[;:]\s*"', text)
    if match:
        text = text[: match.start()]
    return text.strip().rstrip(";:").strip()


def read_wordnet_nouns(path: Path, categories: dict[str, str]) -> list[tuple[str, str, str]]:
    """Noun synsets of the chosen lexicographer files as ``(id, definition, class)``.

    The id is ``n`` + the synset offset (stable across runs). Synsets whose definition
    repeats an earlier one (in file order) are dropped, so no text appears twice and no
    text carries two labels.
    """
    _require_wordnet(path)
    rows, seen = [], set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line[:1].isdigit() or " | " not in line:
                continue  # licence header lines start with spaces
            fields, gloss = line.split(" | ", 1)
            offset, lex_file = fields.split(" ", 2)[:2]
            if lex_file not in categories:
                continue
            text = definition(gloss)
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append((f"n{offset}", text, categories[lex_file]))
    if not rows:
        raise BuildError(f"{path} has no noun synsets in the categories {sorted(categories)}")
    return rows


# --------------------------------------------------------------------------- splits


def sample_indices(n: int, limit: int | None, rng: random.Random) -> list[int]:
    """``limit`` indices out of ``range(n)`` drawn without replacement (all if None), sorted."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), limit))


def split_dev(
    candidates: Sequence[int], pool: list[int], limit: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """``(pool, dev)``: ``limit`` dev indices from ``candidates`` outside ``pool``.

    When fewer than ``limit`` candidates lie outside the pool, the dev indices are drawn from
    the pool instead and removed from it. Both lists come back sorted and disjoint.
    """
    in_pool = set(pool)
    rest = [i for i in candidates if i not in in_pool]
    if len(rest) >= limit:
        return pool, sorted(rng.sample(rest, limit))
    if len(pool) <= limit:
        raise BuildError(f"too few examples for a dev split of {limit}; lower --max-dev")
    dev = set(rng.sample(pool, limit))
    return [i for i in pool if i not in dev], sorted(dev)


def draw_test_first(
    count: int, seed: int, max_unlabeled: int | None, max_dev: int, max_test: int | None
) -> tuple[list[int], list[int], list[int]]:
    """``(pool, dev, test)`` indices of ``range(count)`` for a source without its own test
    split: test is drawn first, the pool from the rest, dev from what the pool leaves."""
    test = sample_indices(count, max_test, _rng(seed, "test"))
    test_set = set(test)
    rest = [i for i in range(count) if i not in test_set]
    pool = [rest[j] for j in sample_indices(len(rest), max_unlabeled, _rng(seed, "pool"))]
    pool, dev = split_dev(rest, pool, max_dev, _rng(seed, "dev"))
    return pool, dev, test


def per_class(
    labels: Sequence, pool: Sequence[int], k: int, rng: random.Random, classes: Sequence
) -> list[int]:
    """``k`` indices per class drawn from ``pool`` (a subset of the label positions), sorted."""
    chosen = []
    for cls in classes:
        members = [i for i in pool if labels[i] == cls]
        if len(members) < k:
            raise BuildError(
                f"class '{cls}' has only {len(members)} examples in the unlabeled pool, "
                f"fewer than --labels-per-class {k}; raise --max-unlabeled"
            )
        chosen.extend(rng.sample(members, k))
    return sorted(chosen)


def _shuffle_key(sample_id: str) -> str:
    return hashlib.sha1(sample_id.encode("utf-8")).hexdigest()


def _rng(seed: int, purpose: str) -> random.Random:
    # One independent stream per purpose: changing --max-test leaves the pool untouched.
    return random.Random(f"zmdevice-{purpose}-{seed}")


# --------------------------------------------------------------------------- writing


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_classes(path: Path, descriptions: dict[str, str], comment: str) -> None:
    lines = [f"# {comment}", "# class = description used as the zero-shot prompt"]
    lines += [f"{json.dumps(name)} = {json.dumps(text)}" for name, text in descriptions.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path, optimize=True)


class _Staging:
    """Build a data set folder beside its target and swap it in only when complete.

    An existing target is replaced only if an earlier build made it (it has BUILD.json), so
    a wrong ``--out`` never deletes someone's folder.
    """

    def __init__(self, target: Path):
        self.target = target
        if target.exists() and not (target / "BUILD.json").is_file():
            raise BuildError(
                f"{target} exists and was not made by this script; remove it or choose "
                "another --out"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))

    def commit(self, build_info: dict) -> None:
        (self.path / "BUILD.json").write_text(json.dumps(build_info, indent=2) + "\n")
        if self.target.exists():
            shutil.rmtree(self.target)
        self.path.rename(self.target)

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def build_images(
    out: Path,
    *,
    fashion_dir: Path = FASHION_DIR,
    labels_per_class: int = 4,
    seed: int = 0,
    max_unlabeled: int | None = None,
    max_test: int | None = None,
    max_dev: int = 1000,
) -> dict:
    """Write ``out`` (e.g. data/images) from Fashion-MNIST; returns the split sizes."""
    splits = load_fashion(fashion_dir)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    names = [FASHION_CLASSES[int(y)] for y in train_y]
    pool = sample_indices(len(train_y), max_unlabeled, _rng(seed, "pool"))
    pool, dev = split_dev(range(len(train_y)), pool, max_dev, _rng(seed, "dev"))
    labeled = per_class(names, pool, labels_per_class, _rng(seed, "labeled"), FASHION_CLASSES)
    test = sample_indices(len(test_y), max_test, _rng(seed, "test"))

    test_images = [(test_x[i], FASHION_CLASSES[int(test_y[i])], f"test-{i:05d}") for i in test]
    return _write_image_folder(
        out,
        train=lambda i: (train_x[i], names[i], f"train-{i:05d}"),
        parts=(pool, labeled, dev),
        test=test_images,
        descriptions=FASHION_DESCRIPTIONS,
        comment="Fashion-MNIST classes (folder names of labeled/ and test/)",
        build_info={
            "source": "Fashion-MNIST (Zalando SE, MIT licence)",
            "labels_per_class": labels_per_class,
            "seed": seed,
            "max_unlabeled": max_unlabeled,
            "max_dev": max_dev,
            "max_test": max_test,
        },
    )


def build_digits(
    out: Path,
    *,
    source: tuple[np.ndarray, np.ndarray] | None = None,
    labels_per_class: int = 4,
    seed: int = 0,
    max_unlabeled: int | None = None,
    max_test: int = DIGITS_TEST,
    max_dev: int = DIGITS_DEV,
) -> dict:
    """Write ``out`` (e.g. data/digits) from the 8x8 digits; returns the split sizes.

    ``source``: ``(images uint8 [N, 8, 8], labels in 0..9)``, default scikit-learn's. The
    images stay 8x8 (the files hold the data as published; every reader resizes to its
    model's input size bilinearly, so an upscaled copy would only fix one interpolation
    choice into the data). Splits as for the text (``draw_test_first``).
    """
    images, labels = load_digits() if source is None else source
    names = [list(DIGIT_DESCRIPTIONS)[int(y)] for y in labels]
    pool, dev, test = draw_test_first(len(labels), seed, max_unlabeled, max_dev, max_test)
    labeled = per_class(names, pool, labels_per_class, _rng(seed, "labeled"), DIGIT_DESCRIPTIONS)
    return _write_image_folder(
        out,
        train=lambda i: (images[i], names[i], f"digit-{i:05d}"),
        parts=(pool, labeled, dev),
        test=[(images[i], names[i], f"digit-{i:05d}") for i in test],
        descriptions=DIGIT_DESCRIPTIONS,
        comment="handwritten digits 0-9 (folder names of labeled/, dev/ and test/)",
        build_info={
            "source": "scikit-learn load_digits (UCI optical recognition of handwritten "
            "digits, CC BY 4.0), 8x8 pixels, grey levels 0..16 scaled to 0..255",
            "labels_per_class": labels_per_class,
            "seed": seed,
            "max_unlabeled": max_unlabeled,
            "max_dev": max_dev,
            "max_test": max_test,
        },
    )


def _write_image_folder(
    out: Path, *, train, parts, test, descriptions: dict, comment: str, build_info: dict
) -> dict:
    """Write an image data set folder; returns the split sizes.

    ``train(i)`` gives ``(pixels, class, file stem)`` of example ``i`` of the pool, labeled
    and dev index lists ``parts``; ``test`` lists ``(pixels, class, file stem)``.
    """
    pool, labeled, dev = parts
    staging = _Staging(out)
    try:
        gold = []
        for i in pool:
            pixels, name, stem = train(i)
            _save_png(pixels, staging.path / "unlabeled" / f"{stem}.png")
            gold.append((f"{stem}.png", f"unlabeled/{stem}.png", name))
        for i in labeled:
            # Same pixels and file name as in unlabeled/: the labeled set is part of the pool.
            _, name, stem = train(i)
            source = staging.path / "unlabeled" / f"{stem}.png"
            target = staging.path / "labeled" / name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        for i in dev:
            pixels, name, stem = train(i)
            _save_png(pixels, staging.path / "dev" / name / f"{stem}.png")
        for pixels, name, stem in test:
            _save_png(pixels, staging.path / "test" / name / f"{stem}.png")
        _write_csv(staging.path / "unlabeled_gold.csv", ("id", "path", "label"), gold)
        _write_classes(staging.path / "classes.toml", descriptions, comment)
        sizes = {
            "unlabeled": len(pool),
            "labeled": len(labeled),
            "dev": len(dev),
            "test": len(test),
        }
        staging.commit({**build_info, "sizes": sizes})
    except BaseException:
        staging.abandon()
        raise
    return sizes


def build_text(
    out: Path,
    *,
    wordnet_file: Path = WORDNET_NOUNS,
    labels_per_class: int = 4,
    seed: int = 0,
    max_unlabeled: int | None = None,
    max_test: int | None = 5000,
    max_dev: int = 1000,
) -> dict:
    """Write ``out`` (e.g. data/text) from WordNet noun definitions; returns the split sizes.

    The test split is drawn first from all synsets; the unlabeled pool from the rest, so
    no synset and no definition is in both; the dev split comes from what the pool leaves.
    """
    rows = read_wordnet_nouns(wordnet_file, WORDNET_CATEGORIES)
    classes = list(WORDNET_DESCRIPTIONS)
    pool, dev, test = draw_test_first(len(rows), seed, max_unlabeled, max_dev, max_test)
    labels = [row[2] for row in rows]
    labeled = per_class(labels, pool, labels_per_class, _rng(seed, "labeled"), classes)
    # data.noun is grouped by category; list rows in a fixed pseudo-random order instead so
    # the head of a file shows every class (ids, not positions, identify the rows).
    pool, labeled, dev, test = (
        sorted(part, key=lambda i: _shuffle_key(rows[i][0])) for part in (pool, labeled, dev, test)
    )

    staging = _Staging(out)
    try:
        folder = staging.path
        _write_csv(folder / "unlabeled.csv", ("id", "text"), [rows[i][:2] for i in pool])
        _write_csv(folder / "unlabeled_gold.csv", ("id", "text", "label"), [rows[i] for i in pool])
        _write_csv(folder / "labeled.csv", ("id", "text", "label"), [rows[i] for i in labeled])
        _write_csv(folder / "dev.csv", ("id", "text", "label"), [rows[i] for i in dev])
        _write_csv(folder / "test.csv", ("id", "text", "label"), [rows[i] for i in test])
        _write_classes(
            folder / "classes.toml",
            WORDNET_DESCRIPTIONS,
            "WordNet 3.0 noun categories (lexicographer files) of the definitions",
        )
        sizes = {
            "unlabeled": len(pool),
            "labeled": len(labeled),
            "dev": len(dev),
            "test": len(test),
        }
        staging.commit(
            {
                "source": "WordNet 3.0 data.noun (Princeton University, WordNet 3.0 licence)",
                "categories": {name: f"noun.{name}" for name in classes},
                "labels_per_class": labels_per_class,
                "seed": seed,
                "max_unlabeled": max_unlabeled,
                "max_dev": max_dev,
                "max_test": max_test,
                "sizes": sizes,
            }
        )
    except BaseException:
        staging.abandon()
        raise
    return sizes


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder")
    parser.add_argument("--labels-per-class", type=int, default=4, help="K true labels per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument(
        "--max-unlabeled", type=int, default=None, help="cap on the unlabeled pool (default: all)"
    )
    parser.add_argument(
        "--max-test",
        type=int,
        default=None,
        help=f"cap on each test split (default: all 10k images; 5,000 texts; {DIGITS_TEST} digits)",
    )
    parser.add_argument(
        "--max-dev",
        type=int,
        default=None,
        help=f"size of each dev split (default: 1,000; {DIGITS_DEV} digits)",
    )
    parser.add_argument(
        "--only", choices=("images", "text", "digits"), help="build only one data set"
    )
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--wordnet-file", type=Path, default=WORDNET_NOUNS)
    args = parser.parse_args(argv)
    for name in ("labels_per_class", "max_unlabeled", "max_test", "max_dev"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common = {
        "labels_per_class": args.labels_per_class,
        "seed": args.seed,
        "max_unlabeled": args.max_unlabeled,
    }
    wanted = [name for name in ("images", "text", "digits") if args.only in (None, name)]

    def cap(value: int | None, default: int | None) -> int | None:
        return default if value is None else value

    try:
        # Check every source first, so a missing one fails before an hour of building.
        if "images" in wanted:
            _require_fashion(args.fashion_dir)
        if "text" in wanted:
            _require_wordnet(args.wordnet_file)
        digits = load_digits() if "digits" in wanted else None
        if digits is not None:
            # Caps meant for the large sets (--max-test 2000) would leave no digit pool.
            left = len(digits[1]) - cap(args.max_test, DIGITS_TEST) - cap(args.max_dev, DIGITS_DEV)
            if left < 1:
                raise BuildError(
                    f"--max-test and --max-dev leave no pool of the {len(digits[1])} digits: "
                    "build them on their own (--only digits) with smaller caps"
                )
        if "images" in wanted:
            sizes = build_images(
                args.out / "images",
                fashion_dir=args.fashion_dir,
                max_test=args.max_test,
                max_dev=cap(args.max_dev, 1000),
                **common,
            )
            print(f"{args.out / 'images'}: {sizes}")
        if "text" in wanted:
            sizes = build_text(
                args.out / "text",
                wordnet_file=args.wordnet_file,
                max_test=cap(args.max_test, 5000),
                max_dev=cap(args.max_dev, 1000),
                **common,
            )
            print(f"{args.out / 'text'}: {sizes}")
        if "digits" in wanted:
            sizes = build_digits(
                args.out / "digits",
                source=digits,
                max_test=cap(args.max_test, DIGITS_TEST),
                max_dev=cap(args.max_dev, DIGITS_DEV),
                **common,
            )
            print(f"{args.out / 'digits'}: {sizes}")
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
