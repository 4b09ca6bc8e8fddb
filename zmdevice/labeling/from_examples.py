"""Which labels a labeling run writes: the zero-shot ones, or with ``--few-shot`` and
``--refine`` the few-shot teacher's or refined ones (``zmdevice.label_source`` chooses,
``zmdevice.refine`` spreads)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from zmdevice.errors import UserError, listing
from zmdevice.label_source import (
    DEFAULT_SOURCES,
    REFINED,
    Evidence,
    choose,
    data_graph,
    make_labels,
)


def open_few_shot(path, data_options, classes):
    """The labeled examples of ``--few-shot``, checked against ``classes``; a warning names
    the classes without an example."""
    from zmdevice.classes import check_few_shot_classes
    from zmdevice.data import label_indices, open_dataset

    labeled = open_dataset(path, data_options, require_labels=True)
    where = f"--few-shot {path}"
    label_indices(labeled, classes)  # an unknown class is named first
    missing = check_few_shot_classes(labeled.labels, classes, where)
    if missing:
        print(
            f"warning: {where} has no example of {listing(missing)}: only the FM speaks "
            "for those classes",
            file=sys.stderr,
        )
    return labeled


def allowed_sources(
    teacher, spec: str, has_labeled: bool, refine: bool | None, sharded: bool
) -> tuple[str, ...]:
    """The label sources (``zmdevice.label_source``) this run may choose from: none without
    labeled examples; the refined ones (``DEFAULT_SOURCES``, chosen on the benchmark's dev
    splits) by default and with ``--refine``; the few-shot teacher with ``--no-refine``;
    few-shot or zero-shot in a run that cannot see every sample's features at once
    (``--shard``).

    Args:
        spec: the ``--teacher`` the error names.
    """
    if (refine or has_labeled) and teacher.features_and_probs is None:
        flag = "--refine" if refine else "--few-shot"
        raise UserError(
            f"{flag} needs a teacher with a feature space (text-embed or imagenet); "
            f"'{spec}' has none: label without {flag}"
        )
    if not has_labeled:
        return ()
    if refine is False:
        return ("few-shot",)
    if sharded:
        return ("few-shot", "zero-shot")
    return DEFAULT_SOURCES


def needs_features(refine: bool | None, allowed: tuple[str, ...]) -> bool:
    """Whether the labels are made after labeling, from every sample's FM features."""
    return bool(refine) or bool(set(allowed) & set(REFINED))


@dataclass(frozen=True)
class LabeledExamples:
    """The user's labeled examples (``--few-shot``) and the FM's outputs on them."""

    dataset: Any
    class_list: Any
    """The ``ClassList`` the teacher labels."""
    features: np.ndarray
    """float [L, D] FM features."""
    probs: np.ndarray
    """float [L, C] zero-shot probabilities."""
    classes: np.ndarray
    """int [L] class ids."""

    @classmethod
    def of(cls, teacher, labeled, class_list) -> LabeledExamples:
        """``labeled`` and ``teacher``'s outputs on it (one pass, in this process)."""
        from zmdevice.data import label_indices
        from zmdevice.fewshot import teacher_outputs

        features, probs = teacher_outputs(teacher, labeled)
        return cls(labeled, class_list, features, probs, label_indices(labeled, class_list))

    def evidence(self, features=None, probs=None) -> Evidence:
        """What ``label_source`` decides from; the data's features and probabilities are
        needed for the refined sources only."""
        return Evidence(features, probs, self.features, self.classes, self.probs)

    def adapt(self, teacher):
        """``teacher`` adapted to these examples (``fewshot.adapt_teacher``)."""
        from zmdevice.fewshot import adapt_teacher

        return adapt_teacher(teacher, self.dataset, self.class_list, features=self.features)


def choose_before_labeling(examples: LabeledExamples, allowed, teacher):
    """Without refinement the choice needs the labeled examples only: it is made before
    labeling, and a chosen few-shot teacher labels the data directly.

    Returns:
        (the teacher that labels, its metadata with the decision under ``label_source``).
    """
    decision = choose(examples.evidence(), allowed)
    if decision["chosen"] == "few-shot":
        teacher = examples.adapt(teacher)
    return teacher, dict(teacher.info, label_source=decision)


def labels_from_features(zero_shot, features, examples, allowed, class_prior, teacher):
    """The labels to write, made from the joined zero-shot labels and the FM features.

    Without labeled examples (``examples`` None) the zero-shot labels are refined
    (``--refine``); with them the label source is chosen among ``allowed`` by
    cross-validation (``label_source.choose``).

    Returns:
        (ids, probabilities float32 [N, C], the output's metadata, the teacher that answers
        ``--gold`` for samples outside the data).
    """
    from zmdevice.refine import METHOD, refine_labels

    probs = zero_shot.dense_probs()
    teacher_info = dict(zero_shot.metadata["teacher"])
    gold_teacher = teacher
    if examples is None:
        labels, info = refine_labels(features, probs, class_prior=class_prior)
        teacher_info["refine"] = {**info, "method": METHOD}
    else:
        evidence = examples.evidence(features, probs)
        graph = data_graph(evidence) if set(allowed) & set(REFINED) else None
        decision = choose(evidence, allowed, graph)
        labels, info = make_labels(decision["chosen"], evidence, class_prior, graph)
        teacher_info["label_source"] = decision
        if decision["chosen"] in REFINED:
            teacher_info["refine"] = {**info, "method": METHOD}
        if decision["chosen"] in ("few-shot", "refined"):
            adapted = examples.adapt(teacher)
            teacher_info["few_shot"] = adapted.info["few_shot"]
            if decision["chosen"] == "few-shot":
                gold_teacher = adapted
    metadata = dict(zero_shot.metadata, teacher=teacher_info)
    return list(zero_shot.ids), labels, metadata, gold_teacher
