"""Build the benchmark data sets from offline sources into zmdevice's formats.

Sources (the first two are Debian packages, installed by .ci/run):
  - Fashion-MNIST, ``apt-get install dataset-fashion-mnist``: idx files in
    /usr/share/datasets/fashion-mnist (60k train + 10k test, 28x28 grey, MIT licence).
  - WordNet 3.0, ``apt-get install wordnet-base``: /usr/share/wordnet/data.noun; each noun
    synset's definition is a text, its lexicographer file (8 categories) the label. The
    other WordNet sets (``WORDNET_DOMAINS``: the 15 verb files, all 25 noun files, the 44
    files of every part of speech, the 4 parts of speech, 60 noun hypernyms) read
    data.verb, data.adj and data.adv beside it too; they, and ``images-groups4`` (the
    Fashion-MNIST images in 4 groups), are built only when named with ``--only``.
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
    DIR/text-verbs/... (each WORDNET_DOMAINS)    as DIR/text/ (ids: part of speech + offset)
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

FASHION_GROUPS = {
    "top": ["t-shirt", "pullover", "dress", "coat", "shirt"],
    "bottom": ["trouser"],
    "footwear": ["sandal", "sneaker", "ankle-boot"],
    "bag": ["bag"],
}
"""``images-groups4``: Fashion-MNIST's classes grouped into 4 (the images and splits of
``images``; a dress counts as a top, as the garment covering the upper body)."""

FASHION_GROUP_DESCRIPTIONS = {
    "top": "a top or a dress, such as a jersey, a sweatshirt, a cardigan, a gown or a coat",
    "bottom": "a pair of trousers, such as jeans",
    "footwear": "footwear, such as a sandal, a running shoe or a boot",
    "bag": "a bag, such as a purse, a mailbag, a backpack or a plastic bag",
}
"""Each description names the ImageNet classes its group should take (the image teacher
matches ImageNet names to these words when no shipped class map fits)."""

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


LEXNAMES = {
    "00": "adj.all", "01": "adj.pert", "02": "adv.all", "03": "noun.Tops", "04": "noun.act",
    "05": "noun.animal", "06": "noun.artifact", "07": "noun.attribute", "08": "noun.body",
    "09": "noun.cognition", "10": "noun.communication", "11": "noun.event",
    "12": "noun.feeling", "13": "noun.food", "14": "noun.group", "15": "noun.location",
    "16": "noun.motive", "17": "noun.object", "18": "noun.person", "19": "noun.phenomenon",
    "20": "noun.plant", "21": "noun.possession", "22": "noun.process", "23": "noun.quantity",
    "24": "noun.relation", "25": "noun.shape", "26": "noun.state", "27": "noun.substance",
    "28": "noun.time", "29": "verb.body", "30": "verb.change", "31": "verb.cognition",
    "32": "verb.communication", "33": "verb.competition", "34": "verb.consumption",
    "35": "verb.contact", "36": "verb.creation", "37": "verb.emotion", "38": "verb.motion",
    "39": "verb.perception", "40": "verb.possession", "41": "verb.social", "42": "verb.stative",
    "43": "verb.weather", "44": "adj.ppl",
}  # fmt: skip
"""WordNet 3.0's lexicographer files (``lexnames(5WN)``): number -> name."""

NOUN_DESCRIPTIONS = {
    "act": "an act, something people do, such as an action, activity, game, sport or deed",
    "animal": WORDNET_DESCRIPTIONS["animal"],
    "artifact": WORDNET_DESCRIPTIONS["artifact"],
    "attribute": "an attribute, a quality of a person or thing, such as size, colour or character",
    "body": WORDNET_DESCRIPTIONS["body"],
    "cognition": "a cognition, a thought, idea, belief, piece of knowledge or field of study",
    "communication": "a communication, a message such as speech, writing, a language or a sign",
    "event": "an event, something that happens, such as an incident, occasion, change or sound",
    "feeling": "a feeling, an emotion or mood such as love, fear, anger, joy or desire",
    "food": WORDNET_DESCRIPTIONS["food"],
    "group": "a group, a collection of people or things, such as an organization, family or set",
    "location": WORDNET_DESCRIPTIONS["location"],
    "motive": "a motive, a reason or goal for acting, such as a need, a purpose or a conscience",
    "object": "a natural object, such as a celestial body, a landform, a rock or a body of water",
    "person": WORDNET_DESCRIPTIONS["person"],
    "phenomenon": "a phenomenon, a natural force or effect, such as weather, light or energy",
    "plant": WORDNET_DESCRIPTIONS["plant"],
    "possession": "a possession, money or property, such as a payment, asset, debt, tax or fee",
    "process": "a process, a natural or bodily process such as growth, decay or a reaction",
    "quantity": "a quantity, an amount or a unit of measure, such as a number, length or weight",
    "relation": "a relation, a connection between people, things or ideas, such as a part or ratio",
    "shape": "a shape, a two- or three-dimensional form such as a line, curve, angle or solid",
    "state": "a state, a condition of being, such as a disease, a situation or a social state",
    "substance": WORDNET_DESCRIPTIONS["substance"],
    "time": "a time, a period or point in time, such as a day, season, era, age or duration",
}
"""Every noun lexicographer file but noun.Tops (its 51 top concepts): class -> description
(the 8 of the ``text`` set kept word for word)."""

VERB_DESCRIPTIONS = {
    "body": "to care for or use the body, such as grooming, dressing, washing or breathing",
    "change": "to change something, such as its size, temperature, shape or intensity",
    "cognition": "to think, such as judging, reasoning, analysing, remembering or doubting",
    "communication": "to communicate, such as telling, asking, ordering, writing or singing",
    "competition": "to compete, such as fighting, attacking, defending or playing a sport",
    "consumption": "to consume, such as eating, drinking, feeding or using something up",
    "contact": "to touch, such as hitting, pressing, tying, cutting, attaching or digging",
    "creation": "to create, such as making, building, sewing, baking, painting or performing",
    "emotion": "to feel or cause an emotion, such as loving, fearing, pleasing or annoying",
    "motion": "to move, such as walking, running, flying, swimming, travelling or falling",
    "perception": "to perceive, such as seeing, hearing, smelling, tasting or sensing",
    "possession": "to own or transfer, such as buying, selling, owning, giving or taking",
    "social": "to act in society, such as governing, working, meeting, marrying or voting",
    "stative": "to be in a state, such as being, having, existing, containing or resembling",
    "weather": "of the weather, such as raining, snowing, thawing, thundering or shining",
}
"""The 15 verb lexicographer files (``verb.<class>``): class -> description."""

OTHER_DESCRIPTIONS = {
    "adj.all": "a quality, an adjective describing how something is, such as big, good or red",
    "adj.pert": "relating to something, an adjective such as musical, atomic or American",
    "adj.ppl": "a participle used as an adjective, such as broken, written or moving",
    "adv.all": "a manner or degree, an adverb saying how, when or where, such as quickly",
}
"""The adjective and adverb lexicographer files: lexname -> description."""

PART_OF_SPEECH_DESCRIPTIONS = {
    "noun": "a noun, a word naming a thing, a person, a place or an idea",
    "verb": "a verb, a word for an action, an event or a state, such as doing or being",
    "adjective": "an adjective, a word describing a quality of a thing, such as big, red or good",
    "adverb": "an adverb, a word saying how, when, where or how much, such as quickly or very",
}


class WordNetDomain:
    """A text data set of WordNet definitions labeled by their lexicographer files.

    A plain class, not a dataclass: the tests load this script as a module without
    registering it, which dataclasses need.

    Args:
        files: WordNet data files read, in this order (a definition seen before is dropped).
        categories: lexicographer file number -> class name (several files may share one).
        descriptions: class name -> zero-shot description, in the order of classes.toml.
        comment: the first line of classes.toml.
        cap: most synsets kept per class, drawn with ``--seed`` before the splits (None:
            all), so that small classes are not lost among large ones.
    """

    def __init__(
        self,
        files: tuple[str, ...],
        categories: dict[str, str],
        descriptions: dict[str, str],
        comment: str,
        cap: int | None = None,
    ):
        self.files, self.categories, self.descriptions = files, categories, descriptions
        self.comment, self.cap = comment, cap

    def read(self, paths: Sequence[Path]) -> tuple[list, dict[str, str], dict[str, str]]:
        """``(rows (id, definition, class), class -> description, class -> the WordNet
        files it stands for)`` from the data files ``paths`` (``files``, in order)."""
        lexnames = {name: ", ".join(LEXNAMES[key] for key, cls in self.categories.items()
                                    if cls == name) for name in self.descriptions}  # fmt: skip
        return read_wordnet(paths, self.categories), self.descriptions, lexnames


class HypernymDomain(WordNetDomain):
    """Noun definitions labeled by an ancestor in WordNet's hypernym tree instead.

    The tree follows each synset's first hypernym (its first instance hypernym when it has
    none). The classes are a cut of it: starting from the root, the node with the most
    descendants is replaced by its children until ``classes`` nodes with at least
    ``min_size`` descendants each are in the cut; those are the classes, each synset below
    one (not the node itself, whose definition is the description) a sample. Descendants of
    the cut's smaller nodes are left out. Description: the node's first word and its
    definition ("a mammal, any warm-blooded vertebrate ...").
    """

    def __init__(self, comment: str, cap: int | None, classes: int = 60, min_size: int = 150):
        super().__init__(("data.noun",), {}, {}, comment, cap)
        self.classes, self.min_size = classes, min_size

    def read(self, paths: Sequence[Path]) -> tuple[list, dict[str, str], dict[str, str]]:
        (path,) = paths
        nodes = read_noun_tree(path)
        children: dict[str, list[str]] = {}
        for offset, (parent, _, _) in nodes.items():
            if parent is not None:
                children.setdefault(parent, []).append(offset)
        size: dict[str, int] = {}
        for offset in _post_order(children, [o for o, n in nodes.items() if n[0] is None]):
            size[offset] = sum(size[c] + 1 for c in children.get(offset, []))
        cut = [o for o, n in nodes.items() if n[0] is None]
        while sum(size[o] >= self.min_size for o in cut) < self.classes:
            largest = max(cut, key=lambda o: (size[o], o))
            if not children.get(largest):
                raise BuildError(f"{path}: fewer than {self.classes} classes of {self.min_size}")
            cut.remove(largest)
            cut += children[largest]
        chosen = sorted(o for o in cut if size[o] >= self.min_size)
        names, descriptions, provenance = {}, {}, {}
        for offset in chosen:
            word = nodes[offset][1]
            name = word if word not in descriptions else f"{word}-{offset}"
            article = "an" if word[:1].lower() in "aeiou" else "a"
            names[offset] = name
            descriptions[name] = f"{article} {word}, {definition(nodes[offset][2])}"
            provenance[name] = f"n{offset}"
        rows, seen = [], set(definition(nodes[o][2]) for o in chosen)
        for offset in nodes:  # file order
            ancestor = nodes[offset][0]
            while ancestor is not None and ancestor not in names:
                ancestor = nodes[ancestor][0]
            text = definition(nodes[offset][2])
            if ancestor is None or offset in names or not text or text in seen:
                continue
            seen.add(text)
            rows.append((f"n{offset}", text, names[ancestor]))
        return rows, descriptions, provenance


def read_noun_tree(path: Path) -> dict[str, tuple[str | None, str, str]]:
    """Every noun synset of data.noun: offset -> (first hypernym's offset or None, first
    word with spaces, gloss)."""
    _require_wordnet(path)
    nodes = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line[:1].isdigit() or " | " not in line:
                continue
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            words = int(parts[3], 16)
            at = 4 + 2 * words
            pointers = [parts[at + 1 + 4 * j : at + 5 + 4 * j] for j in range(int(parts[at]))]
            hypernyms = [p[1] for p in pointers if p[0] == "@"]
            hypernyms += [p[1] for p in pointers if p[0] == "@i"]
            nodes[parts[0]] = (hypernyms[0] if hypernyms else None,
                               parts[4].replace("_", " "), gloss)  # fmt: skip
    return nodes


def _post_order(children: dict[str, list[str]], roots: list[str]) -> list[str]:
    """Every node under ``roots``, each after all its descendants (no recursion)."""
    order, stack = [], [(root, False) for root in roots]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        stack.append((node, True))
        stack += [(child, False) for child in children.get(node, [])]
    return order


def _lexfiles(pos: str, names: dict[str, str]) -> dict[str, str]:
    """Lexicographer file numbers of ``pos.<class>`` for each class in ``names``."""
    number = {name: key for key, name in LEXNAMES.items()}
    return {number[f"{pos}.{name}"]: name for name in names}


WORDNET_DOMAINS = {
    "text": WordNetDomain(
        ("data.noun",),
        WORDNET_CATEGORIES,
        WORDNET_DESCRIPTIONS,
        "WordNet 3.0 noun categories (lexicographer files) of the definitions",
    ),
    "text-verbs": WordNetDomain(
        ("data.verb",),
        _lexfiles("verb", VERB_DESCRIPTIONS),
        VERB_DESCRIPTIONS,
        "WordNet 3.0 verb categories (lexicographer files) of the definitions",
    ),
    "text-nouns25": WordNetDomain(
        ("data.noun",),
        _lexfiles("noun", NOUN_DESCRIPTIONS),
        NOUN_DESCRIPTIONS,
        "WordNet 3.0 noun categories (all 25 lexicographer files but noun.Tops)",
        cap=800,
    ),
    "text-lex44": WordNetDomain(
        ("data.noun", "data.verb", "data.adj", "data.adv"),
        {key: name for key, name in LEXNAMES.items() if name != "noun.Tops"},
        {
            **{f"noun.{name}": text for name, text in NOUN_DESCRIPTIONS.items()},
            **{f"verb.{name}": text for name, text in VERB_DESCRIPTIONS.items()},
            **OTHER_DESCRIPTIONS,
        },
        "WordNet 3.0 lexicographer files of every part of speech but noun.Tops",
        cap=400,
    ),
    "text-pos4": WordNetDomain(
        ("data.noun", "data.verb", "data.adj", "data.adv"),
        {
            key: {"adj": "adjective", "adv": "adverb"}.get(name.split(".")[0], name.split(".")[0])
            for key, name in LEXNAMES.items()
        },
        PART_OF_SPEECH_DESCRIPTIONS,
        "WordNet 3.0 parts of speech of the definitions",
        cap=4000,
    ),
    "text-hypernyms": HypernymDomain(
        "WordNet 3.0 noun hypernyms (a cut of the first-hypernym tree) of the definitions",
        cap=300,
    ),
}
"""Text data sets from WordNet: name (the folder and ``--only`` name) -> what it holds."""


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
    """Noun synsets of the chosen lexicographer files as ``(id, definition, class)``
    (``read_wordnet`` of data.noun alone)."""
    return read_wordnet([path], categories)


def read_wordnet(paths: Sequence[Path], categories: dict[str, str]) -> list[tuple[str, str, str]]:
    """Synsets of the chosen lexicographer files as ``(id, definition, class)``.

    The id is the part of speech (``n``, ``v``, ``a``, ``r``; adjective satellites are
    ``a``) + the synset offset (stable across runs, unique across the files). Synsets whose
    definition repeats an earlier one (in file order, across ``paths``) are dropped, so no
    text appears twice and no text carries two labels.
    """
    rows, seen = [], set()
    for path in paths:
        _require_wordnet(path)
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line[:1].isdigit() or " | " not in line:
                    continue  # licence header lines start with spaces
                fields, gloss = line.split(" | ", 1)
                offset, lex_file, pos = fields.split(" ", 3)[:3]
                if lex_file not in categories:
                    continue
                text = definition(gloss)
                if not text or text in seen:
                    continue
                seen.add(text)
                rows.append((f"{pos.replace('s', 'a')}{offset}", text, categories[lex_file]))
    if not rows:
        names = ", ".join(str(path) for path in paths)
        raise BuildError(f"{names} has no synsets in the categories {sorted(categories)}")
    return rows


def cap_per_class(
    rows: list[tuple[str, str, str]], cap: int | None, classes: Sequence[str], rng: random.Random
) -> list[tuple[str, str, str]]:
    """At most ``cap`` rows of each class (drawn without replacement), in their file order."""
    if cap is None:
        return rows
    kept = []
    for name in classes:
        members = [i for i, row in enumerate(rows) if row[2] == name]
        kept += members if len(members) <= cap else rng.sample(members, cap)
    return [rows[i] for i in sorted(kept)]


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


def draw_extra_test(
    count: int, used: Sequence[Sequence[int]], limit: int | None, seed: int
) -> list[int]:
    """Up to ``limit`` indices of ``range(count)`` in none of the ``used`` splits (none when
    ``limit`` is None): a second test split, wider than the first, that leaves every other
    split as it was (its own random stream)."""
    if limit is None:
        return []
    taken = {i for part in used for i in part}
    rest = [i for i in range(count) if i not in taken]
    return [rest[j] for j in sample_indices(len(rest), limit, _rng(seed, "extra-test"))]


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
    grouped: bool = False,
    max_extra_test: int | None = None,
) -> dict:
    """Write ``out`` (e.g. data/images) from Fashion-MNIST; returns the split sizes.

    ``grouped``: label the images by ``FASHION_GROUPS`` (the same images in every split).
    ``max_extra_test``: also ``test-extra/``, up to that many test images outside ``test/``.
    """
    splits = load_fashion(fashion_dir)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    group = {member: name for name, members in FASHION_GROUPS.items() for member in members}
    label = [group[name] if grouped else name for name in FASHION_CLASSES]
    descriptions = FASHION_GROUP_DESCRIPTIONS if grouped else FASHION_DESCRIPTIONS
    names = [label[int(y)] for y in train_y]
    pool = sample_indices(len(train_y), max_unlabeled, _rng(seed, "pool"))
    pool, dev = split_dev(range(len(train_y)), pool, max_dev, _rng(seed, "dev"))
    labeled = per_class(names, pool, labels_per_class, _rng(seed, "labeled"), list(descriptions))
    test = sample_indices(len(test_y), max_test, _rng(seed, "test"))
    extra_test = draw_extra_test(len(test_y), [test], max_extra_test, seed)

    def test_images(part: list[int]) -> list[tuple]:
        return [(test_x[i], label[int(test_y[i])], f"test-{i:05d}") for i in part]

    return _write_image_folder(
        out,
        train=lambda i: (train_x[i], names[i], f"train-{i:05d}"),
        parts=(pool, labeled, dev),
        test=test_images(test),
        extra_test=test_images(extra_test),
        descriptions=descriptions,
        comment=f"Fashion-MNIST {'groups' if grouped else 'classes'} (folder names of labeled/ "
        "and test/)",
        build_info={
            "source": "Fashion-MNIST (Zalando SE, MIT licence)",
            **({"groups": FASHION_GROUPS} if grouped else {}),
            "labels_per_class": labels_per_class,
            "seed": seed,
            "max_unlabeled": max_unlabeled,
            "max_dev": max_dev,
            "max_test": max_test,
            **({"max_extra_test": max_extra_test} if max_extra_test else {}),
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
    out: Path,
    *,
    train,
    parts,
    test,
    descriptions: dict,
    comment: str,
    build_info: dict,
    extra_test: Sequence = (),
) -> dict:
    """Write an image data set folder; returns the split sizes.

    ``train(i)`` gives ``(pixels, class, file stem)`` of example ``i`` of the pool, labeled
    and dev index lists ``parts``; ``test`` (and ``extra_test``, written to ``test-extra/``
    when not empty) lists ``(pixels, class, file stem)``.
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
        for split, images in (("test", test), ("test-extra", extra_test)):
            for pixels, name, stem in images:
                _save_png(pixels, staging.path / split / name / f"{stem}.png")
        _write_csv(staging.path / "unlabeled_gold.csv", ("id", "path", "label"), gold)
        _write_classes(staging.path / "classes.toml", descriptions, comment)
        sizes = {
            "unlabeled": len(pool),
            "labeled": len(labeled),
            "dev": len(dev),
            "test": len(test),
            **({"test-extra": len(extra_test)} if extra_test else {}),
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
    domain: str = "text",
    max_extra_test: int | None = None,
) -> dict:
    """Write ``out`` (e.g. data/text) from WordNet definitions; returns the split sizes.

    ``domain``: which of ``WORDNET_DOMAINS`` (default the 8 noun categories); its files are
    read from ``wordnet_file``'s folder (data.noun is ``wordnet_file`` itself). The test
    split is drawn first from all synsets (after the domain's cap per class); the unlabeled
    pool from the rest, so no synset and no definition is in both; the dev split comes from
    what the pool leaves. ``max_extra_test``: also ``test-extra.csv``, up to that many
    synsets in no other split.
    """
    spec = WORDNET_DOMAINS[domain]
    paths = [wordnet_file if name == WORDNET_NOUNS.name else wordnet_file.parent / name
             for name in spec.files]  # fmt: skip
    rows, descriptions, provenance = spec.read(paths)
    classes = list(descriptions)
    rows = cap_per_class(rows, spec.cap, classes, _rng(seed, "cap"))
    pool, dev, test = draw_test_first(len(rows), seed, max_unlabeled, max_dev, max_test)
    extra_test = draw_extra_test(len(rows), [pool, dev, test], max_extra_test, seed)
    labels = [row[2] for row in rows]
    labeled = per_class(labels, pool, labels_per_class, _rng(seed, "labeled"), classes)
    # data.noun is grouped by category; list rows in a fixed pseudo-random order instead so
    # the head of a file shows every class (ids, not positions, identify the rows).
    pool, labeled, dev, test, extra_test = (
        sorted(part, key=lambda i: _shuffle_key(rows[i][0]))
        for part in (pool, labeled, dev, test, extra_test)
    )

    staging = _Staging(out)
    try:
        folder = staging.path
        _write_csv(folder / "unlabeled.csv", ("id", "text"), [rows[i][:2] for i in pool])
        _write_csv(folder / "unlabeled_gold.csv", ("id", "text", "label"), [rows[i] for i in pool])
        _write_csv(folder / "labeled.csv", ("id", "text", "label"), [rows[i] for i in labeled])
        _write_csv(folder / "dev.csv", ("id", "text", "label"), [rows[i] for i in dev])
        _write_csv(folder / "test.csv", ("id", "text", "label"), [rows[i] for i in test])
        if extra_test:
            _write_csv(
                folder / "test-extra.csv", ("id", "text", "label"), [rows[i] for i in extra_test]
            )
        _write_classes(folder / "classes.toml", descriptions, spec.comment)
        sizes = {
            "unlabeled": len(pool),
            "labeled": len(labeled),
            "dev": len(dev),
            "test": len(test),
            **({"test-extra": len(extra_test)} if extra_test else {}),
        }
        staging.commit(
            {
                "source": f"WordNet 3.0 {' + '.join(spec.files)} (Princeton University, "
                "WordNet 3.0 licence)",
                "categories": provenance,
                **({"cap_per_class": spec.cap} if spec.cap else {}),
                "labels_per_class": labels_per_class,
                "seed": seed,
                "max_unlabeled": max_unlabeled,
                "max_dev": max_dev,
                "max_test": max_test,
                **({"max_extra_test": max_extra_test} if max_extra_test else {}),
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
        "--max-extra-test",
        type=int,
        default=None,
        help="also a second test split (test-extra) of up to this many samples in no other "
        "split, for tables that need more test rows; the other splits stay as they were "
        "(images and WordNet sets; the digits have none left)",
    )
    parser.add_argument(
        "--max-dev",
        type=int,
        default=None,
        help=f"size of each dev split (default: 1,000; {DIGITS_DEV} digits)",
    )
    parser.add_argument(
        "--only",
        choices=("images", "images-groups4", "digits", *WORDNET_DOMAINS),
        help="build only one data set (the WordNet sets but text are built only when named)",
    )
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    parser.add_argument(
        "--wordnet-file",
        type=Path,
        default=WORDNET_NOUNS,
        help="WordNet's data.noun; data.verb, data.adj and data.adv are read beside it",
    )
    args = parser.parse_args(argv)
    for name in ("labels_per_class", "max_unlabeled", "max_test", "max_dev", "max_extra_test"):
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
    extra = {"max_extra_test": args.max_extra_test}
    wanted = [name for name in ("images", "text", "digits") if args.only in (None, name)]

    def cap(value: int | None, default: int | None) -> int | None:
        return default if value is None else value

    try:
        # Check every source first, so a missing one fails before an hour of building.
        if "images" in wanted or args.only == "images-groups4":
            _require_fashion(args.fashion_dir)
        if "text" in wanted or args.only in WORDNET_DOMAINS:
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
                **extra,
            )
            print(f"{args.out / 'images'}: {sizes}")
        if "text" in wanted:
            sizes = build_text(
                args.out / "text",
                wordnet_file=args.wordnet_file,
                max_test=cap(args.max_test, 5000),
                max_dev=cap(args.max_dev, 1000),
                **common,
                **extra,
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
        if args.only == "images-groups4":
            sizes = build_images(
                args.out / args.only,
                fashion_dir=args.fashion_dir,
                max_test=args.max_test,
                max_dev=cap(args.max_dev, 1000),
                grouped=True,
                **common,
                **extra,
            )
            print(f"{args.out / args.only}: {sizes}")
        if args.only in WORDNET_DOMAINS and args.only != "text":
            sizes = build_text(
                args.out / args.only,
                wordnet_file=args.wordnet_file,
                max_test=cap(args.max_test, 5000),
                max_dev=cap(args.max_dev, 1000),
                domain=args.only,
                **common,
                **extra,
            )
            print(f"{args.out / args.only}: {sizes}")
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
