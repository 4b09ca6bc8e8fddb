"""The losses of ZeroMatch and its baselines, as pure functions of tensors.

Every loss returns ``(loss, diagnostics)``: a scalar tensor that carries the gradient and a
small dict of detached tensors (mask rate, pseudo-labels, ...) for logging. Nothing here
moves tensors between devices or keeps hidden state; AdaMatch's running class
distributions live in the small explicit ``DistributionAlignment`` object passed in.

Names follow ``docs/method.md``: ``L_s`` (supervised CE), ``L_u`` (FixMatch or AdaMatch on the
main head), ``L_KD`` / ``L_KD2`` (CE against the foundation model's hard labels; the soft
KL variant is beyond the paper) and the ``alpha_t`` ramp.

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def hard_label_ce(logits, labels, ignore_index: int = -1):
    """Cross-entropy against hard labels: ``L_s``, and ``L_KD`` / ``L_KD2`` with FM labels.

    Args:
        logits: [B, C] float logits.
        labels: [B] int64 class ids; entries equal to ``ignore_index`` do not count (a
            labeled sample the pseudo-label file does not cover, for instance).
        ignore_index: label value excluded from the mean.

    Returns:
        (loss, {"accuracy": agreement of argmax(logits) with the counted labels}).
        The loss is the mean over counted entries, and 0 (not NaN) when none counts.
    """
    import torch.nn.functional as F

    counted = labels != ignore_index
    per_sample = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    count = counted.sum()
    # sum / max(count, 1): an empty or fully ignored batch gives 0 and a zero gradient.
    loss = (per_sample * counted).sum() / count.clamp(min=1)
    correct = (logits.detach().argmax(dim=1) == labels) & counted
    accuracy = correct.sum().float() / count.clamp(min=1)
    return loss, {"accuracy": accuracy}


def soft_label_kl(logits, target_probs, temperature: float = 1.0):
    """KL(target || student) with temperature, scaled by T^2 (beyond the paper).

    The targets are the FM's class probabilities sharpened or flattened by the same
    temperature (``softmax(log p / T)``), as in Hinton et al.; the T^2 factor keeps the
    gradient scale comparable across temperatures.

    Args:
        logits: [B, C] student logits.
        target_probs: [B, C] FM probabilities (rows sum to 1); no gradient flows to them.
        temperature: T > 0.

    Returns:
        (loss, {"accuracy": agreement of the argmaxes}); mean over the batch, 0 when empty.
    """
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target_probs = target_probs.detach()
    target_log = F.log_softmax(torch.log(target_probs.clamp(min=1e-12)) / temperature, dim=1)
    student_log = F.log_softmax(logits / temperature, dim=1)
    per_sample = (target_log.exp() * (target_log - student_log)).sum(dim=1)
    loss = per_sample.sum() / max(len(per_sample), 1) * temperature**2
    agree = logits.detach().argmax(dim=1) == target_probs.argmax(dim=1)
    accuracy = agree.float().sum() / max(len(agree), 1)
    return loss, {"accuracy": accuracy}


def masked_strong_ce(logits_strong, pseudo_label, mask):
    """CE of the strong view against pseudo-labels, masked, averaged over the WHOLE batch.

    Averaging over all unlabeled samples (not only the confident ones) is what FixMatch and
    USB do: the loss shrinks when few samples pass the threshold, and is 0 when none does.
    """
    import torch.nn.functional as F

    per_sample = F.cross_entropy(logits_strong, pseudo_label, reduction="none")
    return (per_sample * mask.to(per_sample.dtype)).sum() / max(len(per_sample), 1)


def confident_pseudo_label_ce(logits_strong, confidence, pseudo_label, threshold):
    """The step FixMatch and AdaMatch share once they have their pseudo-labels: CE of the
    strong view against the pseudo-labels whose confidence reaches ``threshold``, over the
    whole batch (``masked_strong_ce``).

    Args:
        logits_strong: [B, C] logits of the strong views.
        confidence: [B] confidence of each pseudo-label (no gradient).
        pseudo_label: [B] int64 class of each.
        threshold: a float, or a 0-d tensor (AdaMatch's relative threshold).

    Returns:
        (loss, {"mask_rate", "mask" [B] bool, "pseudo_label", "confidence"}).
    """
    mask = confidence >= threshold
    loss = masked_strong_ce(logits_strong, pseudo_label, mask)
    return loss, {
        "mask_rate": mask.float().mean() if len(mask) else mask.float().sum(),
        "mask": mask,
        "pseudo_label": pseudo_label,
        "confidence": confidence,
    }


def fixmatch_loss(logits_weak, logits_strong, threshold: float = 0.95):
    """FixMatch's unlabeled loss: confident weak-view argmax supervises the strong view.

    Args:
        logits_weak: [B, C] main-head logits of the weak views; used as a target only
            (detached), so no gradient flows through the weak view.
        logits_strong: [B, C] main-head logits of the strong views of the same samples.
        threshold: fixed confidence threshold on max softmax probability (paper: 0.95).

    Returns:
        (loss, {"mask_rate", "mask" [B] bool, "pseudo_label" [B] int64, "confidence" [B]}).
    """
    import torch

    with torch.no_grad():
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        confidence, pseudo_label = probs.max(dim=1)
    return confident_pseudo_label_ce(logits_strong, confidence, pseudo_label, threshold)


@dataclass
class DistributionAlignment:
    """AdaMatch's running class distributions (USB ``DistAlignEMAHook``, target = model).

    ``p_model`` is an EMA of the mean weak-view probabilities on unlabeled batches (set to
    the first batch mean), ``p_target`` an EMA of the mean labeled-batch probabilities,
    starting uniform. Aligned probabilities are ``p * p_target / p_model``, renormalised.
    """

    num_classes: int
    """Number of classes C."""
    momentum: float = 0.999
    """EMA momentum of both running distributions."""
    p_model: Any = None
    """[C] running mean of unlabeled weak-view probabilities; None before the first update."""
    p_target: Any = None
    """[C] running mean of labeled probabilities; uniform before the first update."""
    steps: int = field(default=0)
    """Number of updates so far."""

    def __post_init__(self):
        import torch

        if self.p_target is None:
            self.p_target = torch.full((self.num_classes,), 1.0 / self.num_classes)

    def update(self, probs_unlabeled, probs_labeled) -> None:
        """Fold one batch into both EMAs. Probabilities are [B, C]; no gradient is kept."""
        mean_unlabeled = self.batch_mean(probs_unlabeled)
        mean_labeled = self.batch_mean(probs_labeled)
        m = self.momentum
        self.p_target = self.p_target.to(mean_labeled.device) * m + (1 - m) * mean_labeled
        if self.p_model is None:
            self.p_model = mean_unlabeled
        else:
            self.p_model = self.p_model.to(mean_unlabeled.device) * m + (1 - m) * mean_unlabeled
        self.steps += 1

    def batch_mean(self, values):
        """Mean over the batch dimension (over the global batch when training on several
        processes, see ``training.distributed.SharedAlignment``)."""
        return values.detach().float().mean(dim=0)

    def align(self, probs):
        """[B, C] probabilities -> aligned [B, C] rows that are non-negative and sum to 1."""
        p_model = self.p_model if self.p_model is not None else self.p_target
        aligned = (
            probs * (self.p_target.to(probs.device) + 1e-6) / (p_model.to(probs.device) + 1e-6)
        )
        return aligned / aligned.sum(dim=1, keepdim=True)

    def state_dict(self) -> dict:
        """Tensors and counters for checkpoints (CPU copies)."""
        return {
            "num_classes": self.num_classes,
            "momentum": self.momentum,
            "p_model": None if self.p_model is None else self.p_model.detach().cpu().clone(),
            "p_target": self.p_target.detach().cpu().clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"alignment state has {state['num_classes']} classes, expected {self.num_classes}"
            )
        self.momentum = state["momentum"]
        self.p_model = state["p_model"]
        self.p_target = state["p_target"]
        self.steps = state["steps"]


def adamatch_loss(
    logits_weak,
    logits_strong,
    logits_labeled_weak,
    alignment: DistributionAlignment,
    relative_threshold: float = 0.95,
):
    """AdaMatch's unlabeled loss as USB implements it (used by ZeroMatch's reference runs).

    Updates ``alignment`` with this batch first, then aligns the weak-view probabilities,
    masks samples whose aligned confidence is below ``relative_threshold`` times the mean
    max probability of the labeled batch, and applies CE of the strong view against the
    hard aligned argmax, averaged over the whole unlabeled batch.

    Args:
        logits_weak: [B_u, C] main-head logits of the unlabeled weak views (target only).
        logits_strong: [B_u, C] main-head logits of the unlabeled strong views.
        logits_labeled_weak: [B_l, C] main-head logits of the labeled weak views (target
            only: they set the threshold and ``p_target``).
        alignment: running class distributions; mutated (one EMA update).
        relative_threshold: the paper's 0.95.

    Returns:
        (loss, {"mask_rate", "mask", "pseudo_label", "confidence", "threshold"}).
    """
    import torch

    with torch.no_grad():
        probs_unlabeled = torch.softmax(logits_weak.detach().float(), dim=1)
        probs_labeled = torch.softmax(logits_labeled_weak.detach().float(), dim=1)
        alignment.update(probs_unlabeled, probs_labeled)
        aligned = alignment.align(probs_unlabeled)
        threshold = relative_threshold * alignment.batch_mean(probs_labeled.max(dim=1).values)
        confidence, pseudo_label = aligned.max(dim=1)
    loss, diagnostics = confident_pseudo_label_ce(
        logits_strong, confidence, pseudo_label, threshold
    )
    return loss, {**diagnostics, "threshold": threshold}


def alpha_ramp(step: int, num_steps: int) -> float:
    """``alpha_t = linspace(0, 1, num_steps)[step]``: 0 at the first stage-2 step, 1 at the last.

    A one-step stage has nothing to ramp over and gets 1.0 (the full KD weight); steps past
    the end stay at 1.0.
    """
    if num_steps <= 1 or step >= num_steps - 1:
        return 1.0
    return max(step, 0) / (num_steps - 1)
