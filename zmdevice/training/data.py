"""Training data: read the files, check they fit together, join them by id in one index space.

``load_data`` reads labeled, unlabeled, pseudo-label and test files; ``build_data`` caches
every sample once (pixels or token ids) and returns ``TrainData``, everything the loop
reads; ``check_data`` turns the data problems a user can meet into one-line errors before
any training.
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmdevice.config import METHODS, TrainConfig
from zmdevice.errors import UserError


@dataclass
class TrainData:
    """Everything the loop reads, indexed in one space: [unlabeled pool | extra samples].

    Index i < ``num_pool`` is the i-th unlabeled sample; labeled samples whose id is not
    in the pool (and test samples) follow. ``views`` builds model inputs for any indices.
    """

    classes: list[str]
    modality: str
    num_pool: int
    views: Any
    """pipeline.ImageViews or pipeline.TextViews over the whole index space."""
    fm_label: Any
    """int64 [num_pool]: the FM's hard label of each pool sample."""
    fm_probs: Any
    """float32 [num_pool, C] FM probabilities (soft labels), or None."""
    labeled_index: Any
    """int64 [N_l]: index of each labeled sample in the index space."""
    labeled_y: Any
    """int64 [N_l]: true labels."""
    labeled_fm: Any
    """int64 [N_l]: FM labels of the labeled samples (-1 where the file has none)."""
    gold_pool: Any = None
    """int64 [num_pool] labels the unlabeled table happens to carry (diagnostics only)."""
    label_teacher: dict | None = None
    """The pseudo-label file's teacher metadata (how the labels were made), or None."""
    label_accuracy: tuple[int, int] | None = None
    """(right, count): how often the pseudo-labels are right on the labeled examples,
    measured without letting an example judge labels made from it (``label_accuracy``);
    None when unknown."""
    holdout: Any = None
    """int64 indices of pool samples held out of stage 1 (model selection)."""
    kd_train: Any = None
    """int64 indices of pool samples stage 1 trains on."""
    test_index: Any = None
    """int64 [N_t] indices of test samples, or None."""
    test_y: Any = None
    """int64 [N_t] test labels."""
    fingerprint: str = ""


def load_data(config: TrainConfig):
    """Read labeled, unlabeled, pseudo-label and test files and check they fit together.

    Returns:
        (classes, labeled dataset, unlabeled dataset, PseudoLabels or None, test or None).
    """
    from zmdevice.data import open_dataset

    labeled = open_dataset(config.labeled, require_labels=True)
    unlabeled = open_dataset(config.unlabeled, modality=labeled.modality)
    if unlabeled.modality != labeled.modality:
        raise UserError(
            f"--unlabeled {config.unlabeled} holds {unlabeled.modality} data but --labeled "
            f"{config.labeled} holds {labeled.modality} data"
        )
    pseudo = None
    if METHODS[config.method].uses_fm:
        if config.pseudo_labels is None:
            raise UserError(
                f"--method {config.method} needs --pseudo-labels (a file from `zmdevice label`); "
                "use --method supervised, fixmatch or adamatch to train without one"
            )
        from zmdevice.pseudolabels import read_pseudolabels

        if not Path(config.pseudo_labels).is_file():
            raise UserError(f"--pseudo-labels {config.pseudo_labels} does not exist")
        pseudo = read_pseudolabels(config.pseudo_labels, classes=explicit_classes(config))
        pseudo.check_fingerprint(unlabeled.fingerprint(), allow_partial=config.allow_partial)
        classes = pseudo.classes
    else:
        classes = explicit_classes(config) or sorted(set(labeled.labels))
    test = None
    if config.test is not None:
        test = open_dataset(config.test, modality=labeled.modality, require_labels=True)
    return classes, labeled, unlabeled, pseudo, test


def label_accuracy(pseudo, labeled_fm, labeled_y) -> tuple[int, int] | None:
    """(right, count) of the pseudo-labels on the labeled examples, measured fairly.

    Labels ``zmdevice label`` chose by cross-validation carry the chosen source's held-out
    score. Other labels made from the labeled examples (few-shot, refined) have seen them,
    so their agreement with them says nothing: None. Zero-shot labels are scored on the
    labeled examples that the file labels.
    """
    if pseudo is None:
        return None
    teacher = pseudo.metadata.get("teacher", {})
    decision = teacher.get("label_source")
    if decision is not None:
        chosen = decision.get("candidates", {}).get(decision.get("chosen"), {})
        if chosen.get("accuracy") is None or not decision.get("scored"):
            return None
        return int(chosen["right"]), int(decision["scored"])
    if teacher.get("few_shot") or (teacher.get("refine") or {}).get("labeled"):
        return None
    import numpy as np

    fm, truth = np.asarray(labeled_fm), np.asarray(labeled_y)
    known = fm >= 0
    if not known.any():
        return None
    return int((fm[known] == truth[known]).sum()), int(known.sum())


def explicit_classes(config: TrainConfig) -> list[str] | None:
    """An explicit class list (``classes`` in the config file), else None."""
    classes = config.classes
    if classes is None:
        return None
    from zmdevice.classes import load_classes

    return load_classes(",".join(classes) if isinstance(classes, list) else classes).names


def build_data(
    config: TrainConfig, student, classes, labeled, unlabeled, pseudo, test, out=None
) -> TrainData:
    """Join everything by id, cache inputs once, split off the stage-1 held-out slice."""
    import numpy as np
    import torch

    from zmdevice.classes import ClassList
    from zmdevice.data import label_indices

    class_list = ClassList(names=list(classes), prompts={})
    labeled_y = label_indices(labeled, class_list)
    pool_ids = list(unlabeled.ids)
    pool_rows = list(range(len(pool_ids)))
    gold_pool = gold_labels(config, unlabeled, class_list)
    fm_label = fm_probs = None
    labeled_fm = torch.full((len(labeled),), -1, dtype=torch.long)
    if pseudo is not None:
        selected = pseudo.select(pool_ids, allow_partial=config.allow_partial)
        if len(selected) < len(pool_ids):  # --allow-partial: keep the covered ids only
            covered = set(selected.ids)
            pool_rows = [i for i, sample_id in enumerate(pool_ids) if sample_id in covered]
            pool_ids = [pool_ids[i] for i in pool_rows]
            if gold_pool is not None:
                gold_pool = gold_pool[pool_rows]
        fm_label = torch.from_numpy(selected.label.astype(np.int64))
        if config.soft_labels:
            fm_probs = torch.from_numpy(selected.dense_probs())
        by_id = {sample_id: i for i, sample_id in enumerate(pseudo.ids)}
        for row, sample_id in enumerate(labeled.ids):
            key = pool_key(sample_id, labeled, by_id)
            if key is not None:
                labeled_fm[row] = int(pseudo.label[by_id[key]])

    # One index space: the pool, then labeled samples that are not in it, then test.
    position = {sample_id: i for i, sample_id in enumerate(pool_ids)}
    sources = [(unlabeled, row) for row in pool_rows]
    labeled_index = []
    for row, sample_id in enumerate(labeled.ids):
        key = pool_key(sample_id, labeled, position)
        if key is not None:
            labeled_index.append(position[key])
        else:
            labeled_index.append(len(sources))
            sources.append((labeled, row))
    test_index = test_y = None
    if test is not None:
        test_index = torch.arange(len(sources), len(sources) + len(test))
        sources += [(test, row) for row in range(len(test))]
        test_y = torch.from_numpy(label_indices(test, class_list))

    seed = config.seed
    views = make_views(student, sources, config, out)
    num_pool = len(pool_ids)
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(num_pool, generator=generator)
    num_holdout = min(max(1, round(config.holdout_fraction * num_pool)), config.holdout_max)
    return TrainData(
        classes=list(classes),
        modality=student.modality,
        num_pool=num_pool,
        views=views,
        fm_label=fm_label,
        fm_probs=fm_probs,
        labeled_index=torch.tensor(labeled_index, dtype=torch.long),
        labeled_y=torch.from_numpy(labeled_y),
        labeled_fm=labeled_fm,
        label_teacher=None if pseudo is None else pseudo.metadata.get("teacher", {}),
        label_accuracy=label_accuracy(pseudo, labeled_fm, labeled_y),
        gold_pool=gold_pool,
        holdout=order[:num_holdout].sort().values,
        kd_train=order[num_holdout:].sort().values,
        test_index=test_index,
        test_y=test_y,
        fingerprint=unlabeled.fingerprint(),
    )


def pool_key(sample_id: str, labeled, known: dict) -> str | None:
    """The id under which a labeled sample appears in the pool (or the label file), or None.

    Ids match as they are; a labeled image folder's ``<class>/name.png`` also matches the
    pool's ``name.png`` (labeled examples are drawn from the pool, as in the paper).
    """
    if sample_id in known:
        return sample_id
    if labeled.modality == "image" and "/" in sample_id:
        stripped = sample_id.split("/", 1)[1]
        if stripped in known:
            return stripped
    return None


def gold_labels(config: TrainConfig, unlabeled, class_list):
    """True labels of the pool, for diagnostics only (never trained on), or None.

    From ``gold_unlabeled`` in the config (a labeled table or folder with the pool's ids),
    else from the unlabeled table's own label column when it has one.
    """
    import torch

    from zmdevice.data import open_dataset

    known = set(class_list.names)
    gold_path = config.gold_unlabeled
    if gold_path is None:
        if unlabeled.labels is None or not set(unlabeled.labels) <= known:
            return None
        return torch.tensor([class_list.names.index(name) for name in unlabeled.labels])
    gold = open_dataset(Path(gold_path), require_labels=True)
    by_id = dict(zip(gold.ids, gold.labels, strict=True))
    missing = [sample_id for sample_id in unlabeled.ids if sample_id not in by_id]
    if missing:
        raise UserError(
            f"gold_unlabeled {gold_path} lacks {len(missing)} ids of --unlabeled "
            f"(e.g. {missing[0]!r}); give the pool's true labels or drop gold_unlabeled"
        )
    lookup = {name: i for i, name in enumerate(class_list.names)}
    return torch.tensor([lookup.get(by_id[sample_id], -1) for sample_id in unlabeled.ids])


class _Rows:
    """A read-only view of (dataset, row) pairs as one data set (for the image cache)."""

    def __init__(self, sources):
        self.sources = sources
        self.source = sources[0][0].source if sources else Path(".")

    def __len__(self):
        return len(self.sources)

    def load_image(self, i):
        dataset, row = self.sources[i]
        return dataset.load_image(row)


def make_views(student, sources, config: TrainConfig, out=None):
    """Cache every sample once (pixels or token ids) and wrap it in the view builder."""
    from zmdevice import pipeline

    if student.modality == "image":
        preprocess = student.config["preprocess"]
        pixels = pipeline.cache_images(
            _Rows(sources),
            int(preprocess["image_size"]),
            progress=sys.stderr.isatty(),
            spill_dir=out,
            memory_budget=int(config.image_cache_gb * 2**30),
        )
        return pipeline.ImageViews(pixels, tuple(preprocess["mean"]), tuple(preprocess["std"]))
    from zmdevice.augment import TextAugment
    from zmdevice.students import encode_token_ids

    texts = [dataset.texts[row] for dataset, row in sources]
    token_ids = encode_token_ids(student.tokenizer, texts, student.max_length)
    augment = TextAugment(student.mask_token_id, student.special_token_ids)
    return pipeline.TextViews(token_ids, student.pad_token_id, augment, random.Random(config.seed))


def check_data(data: TrainData, plans: list, config: TrainConfig) -> None:
    """Data that cannot train, as one-line user errors before any training."""
    uses_labeled = any(plan.uses_labeled for plan in plans)
    if uses_labeled:
        counts = data.labeled_y.bincount(minlength=len(data.classes))
        empty = [
            name for name, count in zip(data.classes, counts.tolist(), strict=True) if not count
        ]
        named = ", ".join(repr(name) for name in empty)
        if empty and not METHODS[config.method].uses_fm:
            raise UserError(
                f"--labeled {config.labeled} has no example of class(es) {named}, and "
                f"--method {config.method} learns them from labeled examples only: add at "
                "least one labeled example per class, or train zeromatch or kd on the FM's "
                "pseudo-labels"
            )
        if empty:
            # A labeling loop reaches this after a few `suggest` rounds: the FM's labels
            # still teach those classes, as in stage 1, so training goes on.
            print(
                f"warning: --labeled {config.labeled} has no example of class(es) {named}: "
                "only the FM's pseudo-labels teach them",
                file=sys.stderr,
            )
    for plan in plans:
        if not plan.uses_pool:
            continue
        need, have = plan.samplers(data, config)["pool"][::-1]
        what = "stage-1 batch" if plan.selects_model else "unlabeled batch"
        if have < need:
            raise UserError(
                f"--unlabeled {config.unlabeled} has {have} usable samples, fewer than one "
                f"{what} of {need}: add unlabeled data or lower the batch size in --config"
            )


def data_fingerprints(config: TrainConfig, labeled, unlabeled, test) -> dict[str, str]:
    """What a checkpoint remembers of the data, so ``--resume`` refuses other data."""
    prints = {"labeled": labeled.fingerprint(), "unlabeled": unlabeled.fingerprint()}
    if test is not None:
        prints["test"] = test.fingerprint()
    if METHODS[config.method].uses_fm and config.pseudo_labels is not None:
        digest = hashlib.sha256()
        with open(config.pseudo_labels, "rb") as handle:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        prints["pseudo_labels"] = digest.hexdigest()
    return prints
