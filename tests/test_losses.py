"""Property tests of the pure losses (degenerate cases, gradients, reference equivalence)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zmdevice.losses import (
    DistributionAlignment,
    adamatch_loss,
    alpha_ramp,
    fixmatch_loss,
    hard_label_ce,
    soft_label_kl,
)


def logits(*shape, seed=0, scale=1.0, grad=True):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).requires_grad_(grad)


def test_hard_label_ce_matches_torch_and_ignores_missing_labels():
    x = logits(6, 4)
    labels = torch.tensor([0, 1, 2, 3, -1, 1])
    loss, diag = hard_label_ce(x, labels)
    expected = F.cross_entropy(x[labels >= 0], labels[labels >= 0])
    assert torch.allclose(loss, expected)
    assert 0.0 <= float(diag["accuracy"]) <= 1.0


def test_hard_label_ce_all_ignored_is_zero_not_nan():
    x = logits(3, 4)
    loss, _ = hard_label_ce(x, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


def test_soft_kl_equals_cross_entropy_minus_entropy_at_t1():
    x = logits(5, 3)
    target = torch.softmax(logits(5, 3, seed=1, grad=False), dim=1)
    loss, _ = soft_label_kl(x, target, temperature=1.0)
    ce = -(target * F.log_softmax(x, dim=1)).sum(1).mean()
    entropy = -(target * target.log()).sum(1).mean()
    assert torch.allclose(loss, ce - entropy, atol=1e-6)


def test_soft_kl_is_zero_at_the_target_and_scaled_by_t_squared():
    target = torch.softmax(logits(4, 3, seed=2, grad=False), dim=1)
    # Student logits = log target: identical distributions at every temperature.
    at_target, _ = soft_label_kl(target.log().requires_grad_(), target, temperature=2.0)
    assert abs(at_target.item()) < 1e-6
    x = logits(4, 3)
    t = 3.0
    loss, _ = soft_label_kl(x, target, temperature=t)
    sharp = torch.softmax(target.log() / t, dim=1)
    kl = (sharp * (sharp.log() - F.log_softmax(x / t, dim=1))).sum(1).mean()
    assert torch.allclose(loss, kl * t * t, atol=1e-6)


def test_soft_kl_no_gradient_to_targets():
    x = logits(4, 3)
    target_logits = logits(4, 3, seed=3)
    target = torch.softmax(target_logits, dim=1)
    loss, _ = soft_label_kl(x, target, temperature=2.0)
    loss.backward()
    assert target_logits.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fixmatch_all_masked_is_zero_not_nan():
    weak = logits(8, 5, scale=0.01)  # near uniform: nothing reaches 0.95
    strong = logits(8, 5, seed=1)
    loss, diag = fixmatch_loss(weak, strong, threshold=0.95)
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    assert float(diag["mask_rate"]) == 0.0
    loss.backward()
    assert torch.all(strong.grad == 0)


def test_fixmatch_threshold_zero_is_plain_ce_on_weak_argmax():
    weak = logits(8, 5)
    strong = logits(8, 5, seed=1)
    loss, diag = fixmatch_loss(weak, strong, threshold=0.0)
    expected = F.cross_entropy(strong, weak.argmax(dim=1))
    assert torch.allclose(loss, expected)
    assert float(diag["mask_rate"]) == 1.0


def test_fixmatch_no_gradient_through_the_weak_view():
    weak = logits(8, 5, scale=10.0)
    strong = logits(8, 5, seed=1)
    loss, diag = fixmatch_loss(weak, strong, threshold=0.5)
    assert float(diag["mask_rate"]) > 0
    loss.backward()
    assert weak.grad is None
    assert strong.grad.abs().sum() > 0


def test_fixmatch_mask_follows_threshold():
    weak = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    strong = logits(2, 2)
    _, diag = fixmatch_loss(weak, strong, threshold=0.9)
    assert diag["mask"].tolist() == [True, False]
    assert diag["pseudo_label"].tolist() == [0, 0]


def test_alignment_keeps_a_distribution_and_starts_uniform():
    da = DistributionAlignment(num_classes=4)
    assert torch.allclose(da.p_target, torch.full((4,), 0.25))
    probs = torch.softmax(logits(16, 4, grad=False, scale=3.0), dim=1)
    labeled = torch.softmax(logits(4, 4, seed=5, grad=False), dim=1)
    for _ in range(3):
        da.update(probs, labeled)
    aligned = da.align(probs)
    assert torch.all(aligned >= 0)
    assert torch.allclose(aligned.sum(dim=1), torch.ones(16), atol=1e-6)
    assert torch.allclose(da.p_model.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(da.p_target.sum(), torch.tensor(1.0), atol=1e-5)


def test_alignment_first_update_sets_p_model_to_batch_mean_and_ema_after():
    da = DistributionAlignment(num_classes=3, momentum=0.9)
    first = torch.softmax(logits(10, 3, grad=False), dim=1)
    second = torch.softmax(logits(10, 3, seed=1, grad=False), dim=1)
    labeled = torch.softmax(logits(2, 3, seed=2, grad=False), dim=1)
    da.update(first, labeled)
    assert torch.allclose(da.p_model, first.mean(0))
    expected_target = torch.full((3,), 1 / 3) * 0.9 + 0.1 * labeled.mean(0)
    assert torch.allclose(da.p_target, expected_target)
    da.update(second, labeled)
    assert torch.allclose(da.p_model, first.mean(0) * 0.9 + 0.1 * second.mean(0))


def test_alignment_corrects_a_skewed_model_towards_the_target():
    # The model over-predicts class 0 on unlabeled data; alignment must lower class 0.
    da = DistributionAlignment(num_classes=2, momentum=0.0)
    skewed = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    balanced = torch.tensor([[0.5, 0.5]])
    da.update(skewed, balanced)
    aligned = da.align(skewed)
    assert torch.all(aligned[:, 0] < skewed[:, 0])


def test_alignment_state_round_trip():
    da = DistributionAlignment(num_classes=3)
    da.update(
        torch.softmax(logits(4, 3, grad=False), 1), torch.softmax(logits(2, 3, grad=False), 1)
    )
    restored = DistributionAlignment(num_classes=3)
    restored.load_state_dict(da.state_dict())
    assert torch.equal(restored.p_model, da.p_model) and torch.equal(restored.p_target, da.p_target)
    assert restored.steps == 1
    with pytest.raises(ValueError, match="classes"):
        DistributionAlignment(num_classes=4).load_state_dict(da.state_dict())


def test_adamatch_threshold_zero_is_plain_ce_on_aligned_argmax():
    weak, strong, lab = logits(8, 4), logits(8, 4, seed=1), logits(3, 4, seed=2)
    da = DistributionAlignment(num_classes=4)
    loss, diag = adamatch_loss(weak, strong, lab, da, relative_threshold=0.0)
    reference = DistributionAlignment(num_classes=4)
    reference.update(torch.softmax(weak.detach(), 1), torch.softmax(lab.detach(), 1))
    target = reference.align(torch.softmax(weak.detach(), 1)).argmax(1)
    assert torch.allclose(loss, F.cross_entropy(strong, target))
    assert float(diag["mask_rate"]) == 1.0


def test_adamatch_relative_threshold_and_no_gradient_to_targets():
    weak = logits(16, 4, scale=4.0)
    strong = logits(16, 4, seed=1)
    lab = logits(4, 4, seed=2, scale=4.0)
    da = DistributionAlignment(num_classes=4)
    loss, diag = adamatch_loss(weak, strong, lab, da)
    expected = 0.95 * torch.softmax(lab.detach(), 1).max(1).values.mean()
    assert torch.allclose(diag["threshold"], expected)
    assert torch.equal(diag["mask"], diag["confidence"] >= expected)
    loss.backward()
    assert weak.grad is None and lab.grad is None
    assert da.steps == 1


def test_adamatch_all_masked_is_zero_not_nan():
    weak = logits(6, 4, scale=0.01)  # flat unlabeled predictions
    lab = torch.tensor([[20.0, 0, 0, 0]] * 2, requires_grad=True)  # confident labeled batch
    strong = logits(6, 4, seed=1)
    loss, diag = adamatch_loss(weak, strong, lab, DistributionAlignment(num_classes=4))
    assert loss.item() == 0.0 and float(diag["mask_rate"]) == 0.0


def test_alpha_ramp_endpoints_and_linearity():
    n = 11
    values = [alpha_ramp(step, n) for step in range(n)]
    assert values[0] == 0.0 and values[-1] == 1.0
    assert values == pytest.approx(torch.linspace(0, 1, n).tolist())
    assert alpha_ramp(50, n) == 1.0
    assert alpha_ramp(0, 1) == 1.0
