"""Few-shot adaptation of a zero-shot teacher with the few true labels a user has.

A zero-shot FM knows the classes only through prompts (or a class map); the labeled
examples say where the classes lie in the FM's own feature space. The adapter is a
multinomial logistic regression on the FM's L2-normalised features of the labeled examples,
combined with the zero-shot probabilities ``p0`` as a product of experts::

    p(c | x) = softmax_c( w_c . x / |x| + b_c + zero_shot_weight * log p0(c | x) )

With ``zero_shot_weight = 0`` it is the plain probe on the labeled examples; the L2
penalty keeps a probe fitted on 4 examples per class from drowning the prior. Both
settings are chosen on a dev split (``benchmarks/peers.py``), never on test.

``zmdevice label DATA --few-shot LABELED`` wraps the teacher with ``adapt_teacher``; the
pseudo-label file then records the settings and the labeled set's fingerprint in the
teacher's metadata (``few_shot``), and the zero-shot labels remain the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmdevice.errors import UserError
from zmdevice.teachers.base import Teacher

DEFAULT_L2 = 0.001
"""L2 penalty on the probe's weights (per labeled example); chosen on dev."""
DEFAULT_ZERO_SHOT_WEIGHT = 0.25
"""Weight of the zero-shot log-probabilities in the product; chosen on dev.

Both defaults are the grid point with the best mean dev accuracy over both benchmark data
sets and both label counts (4 and 1 per class): one rule for every FM, not the best point of
one data set (``benchmarks/results/*-dev-fewshot-screen.json``)."""
PROBABILITY_FLOOR = 1e-6
"""log p0 is taken of max(p0, floor): a class the FM rules out stays reachable."""


@dataclass
class FewShotAdapter:
    """A fitted probe on FM features plus the weight of the zero-shot prior."""

    weight: np.ndarray
    """float64 [C, D] on L2-normalised features."""
    bias: np.ndarray
    """float64 [C]."""
    zero_shot_weight: float
    unseen: np.ndarray | None = None
    """bool [C]: classes without a labeled example (None: every class has one)."""

    def probs(self, features: np.ndarray, zero_shot_probs: np.ndarray) -> np.ndarray:
        """Adapted probabilities float32 [N, C] from features [N, D] and p0 [N, C].

        A class without a labeled example keeps the FM's probability: the probe, which has
        never seen it, only divides the rest among the classes it has seen (fitted over all
        classes it would push the unseen ones to zero, as if the FM could not name them).
        """
        unit = normalise(features)
        logits = unit @ self.weight.T + self.bias
        if self.zero_shot_weight:
            floor = np.maximum(np.asarray(zero_shot_probs, np.float64), PROBABILITY_FLOOR)
            logits = logits + self.zero_shot_weight * np.log(floor)
        if self.unseen is not None:
            logits[:, self.unseen] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probs = exp / exp.sum(axis=1, keepdims=True)
        if self.unseen is not None:
            prior = np.asarray(zero_shot_probs, np.float64)
            prior = prior / np.maximum(prior.sum(axis=1, keepdims=True), 1e-12)
            probs *= 1.0 - prior[:, self.unseen].sum(axis=1, keepdims=True)
            probs[:, self.unseen] = prior[:, self.unseen]
        return probs.astype(np.float32)


def normalise(features) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64)."""
    array = np.asarray(features, dtype=np.float64)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def fit_adapter(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    l2: float = DEFAULT_L2,
    zero_shot_weight: float = DEFAULT_ZERO_SHOT_WEIGHT,
    max_iter: int = 200,
) -> FewShotAdapter:
    """Fit the probe on labeled features [L, D] with class ids [L] (full-batch L-BFGS).

    The objective is the mean cross-entropy plus ``l2 / 2 * |W|^2``; it is convex, so the
    result depends only on the data and the settings, not on a seed. Classes with unequal
    numbers of examples count equally (``class_balance``).
    """
    import torch

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or len(labels) != len(features):
        raise UserError("few-shot adaptation needs labeled examples with one label each")
    x = torch.from_numpy(normalise(features))
    y = torch.from_numpy(labels)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    balance = class_balance(labels, num_classes)
    balance = None if balance is None else torch.from_numpy(balance)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, weight=balance)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    seen = np.bincount(labels, minlength=num_classes) > 0
    return FewShotAdapter(
        weight=weight.detach().numpy(),
        bias=bias.detach().numpy(),
        zero_shot_weight=float(zero_shot_weight),
        unseen=None if seen.all() else ~seen,
    )


def class_balance(labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """float64 [C] weights that give each labeled class the same total weight (mean 1 per
    example), or None when the classes have equal counts (nothing to correct).

    A few labels per class are rarely drawn in the classes' true proportions: a person labels
    what ``suggest`` or chance put in front of them, so a class with 8 examples beside one
    with 2 says more about the picking than about the data. Left uncorrected, the probe's bias
    and the spreading's seed mass follow those counts and flood the smaller classes (4 parts
    of speech labeled 8 / 4 / 2 / 2: labels below the FM's own zero-shot ones).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts[counts > 0]
    if len(present) == 0 or present.min() == present.max():
        return None
    return np.where(counts > 0, len(labels) / (len(present) * np.maximum(counts, 1)), 0.0)


def teacher_outputs(
    teacher, dataset, batch_size: int = 64, order=None
) -> tuple[np.ndarray, np.ndarray]:
    """FM features [N, D] and zero-shot probabilities [N, C] of every sample (in-process).

    ``order``: the sample order to run in (e.g. texts by length, so batches pad less); the
    results come back in the data set's order either way.
    """
    import torch

    if teacher.features_and_probs is None:
        raise UserError(
            "--few-shot needs a teacher with a feature space (text-embed or imagenet); "
            f"'{teacher.spec}' has none"
        )
    order = np.arange(len(dataset)) if order is None else np.asarray(order)
    features, probs = [], []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            items = [teacher.prepare(dataset[int(i)]) for i in order[start : start + batch_size]]
            batch_features, batch_probs = teacher.features_and_probs(teacher.collate(items))
            features.append(batch_features.float().cpu().numpy())
            probs.append(batch_probs.float().cpu().numpy())
    restore = np.argsort(order)
    return np.concatenate(features)[restore], np.concatenate(probs)[restore]


def adapt_teacher(
    teacher,
    labeled,
    classes,
    *,
    l2: float = DEFAULT_L2,
    zero_shot_weight: float = DEFAULT_ZERO_SHOT_WEIGHT,
    features: np.ndarray | None = None,
):
    """A copy of ``teacher`` whose probabilities are adapted to the ``labeled`` data set.

    Args:
        teacher: a ``Teacher`` with ``features_and_probs``.
        labeled: a labeled data set (``open_dataset(..., require_labels=True)``).
        classes: the ``ClassList`` the teacher was built for.
        features: the teacher's features [L, D] of ``labeled`` when already computed.

    Returns:
        A :class:`FewShotTeacher`; its ``info["few_shot"]`` records the settings and the
        labeled set.
    """
    from zmdevice.data import label_indices

    labels = label_indices(labeled, classes)
    if features is None:
        features, _ = teacher_outputs(teacher, labeled)
    adapter = fit_adapter(features, labels, len(classes), l2=l2, zero_shot_weight=zero_shot_weight)
    few_shot = {
        "labeled": str(labeled.source),
        "fingerprint": labeled.fingerprint(),
        "examples": len(labels),
        "l2": l2,
        "zero_shot_weight": zero_shot_weight,
        "method": "logistic regression on L2-normalised FM features x zero-shot prior",
    }
    return FewShotTeacher(teacher, adapter, few_shot)


class FewShotTeacher(Teacher):
    """A teacher whose probabilities come from ``adapter`` on its own features and
    zero-shot probabilities; everything else (preprocessing, model, stats) is the inner
    teacher's. Plain attributes, so it pickles like the teacher it wraps."""

    def __init__(self, inner: Teacher, adapter: FewShotAdapter, few_shot: dict):
        # Not Teacher.__init__: every attribute is the inner teacher's, already built.
        self.inner, self.adapter = inner, adapter
        self.kind, self.modality = inner.kind, inner.modality
        self.spec, self.classes = inner.spec, inner.classes
        self.prepare, self.collate = inner.prepare, inner.collate
        self.model, self.device, self.stats = inner.model, inner.device, inner.stats
        self.info = dict(inner.info, few_shot=few_shot)

    def features_and_probs(self, batch):
        """(the inner teacher's features [B, D], adapted probabilities [B, C])."""
        import torch

        batch_features, zero_shot = self.inner.features_and_probs(batch)
        adapted = self.adapter.probs(batch_features.float().cpu().numpy(), zero_shot.cpu().numpy())
        return batch_features, torch.from_numpy(adapted)

    def forward(self, batch):
        return self.features_and_probs(batch)[1]
