import math

import pytest
import torch
import torch.nn.functional as F

from attrclf.errors import AttrclfError
from attrclf.losses import NA_POLICIES, AsymmetricLoss, FocalLoss, MaskedBCEWithLogits, apply_na_policy, build_loss


def bce(logit, target, pos_weight=1.0):
    p = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


def test_masked_bce_equals_hand_computation_over_known_entries():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    pos_weight = torch.tensor([2.0, 1.0, 4.0])
    loss = MaskedBCEWithLogits(pos_weight)(logits, targets, mask)
    expected = (bce(2.0, 1, 2.0) + bce(0.5, 1, 4.0) + bce(0.0, 0, 2.0) + bce(3.0, 1, 1.0)) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_target_under_na_changes_neither_loss_nor_gradient():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    results = []
    for na_target in (0.0, 1.0, 0.37):
        logits = torch.tensor([[0.3, -0.8], [1.2, 0.1]], requires_grad=True)
        t = targets.clone()
        t[0, 1] = na_target
        loss = MaskedBCEWithLogits(torch.tensor([3.0, 0.5]))(logits, t, mask)
        loss.backward()
        results.append((loss.item(), logits.grad.clone()))
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        assert torch.equal(grad, results[0][1])
    assert results[0][1][0, 1] == 0  # no gradient at all flows to the NA entry


def test_na_entry_with_infinite_logit_stays_finite():
    logits = torch.tensor([[float("inf"), 0.5]], requires_grad=True)
    loss = MaskedBCEWithLogits()(logits, torch.tensor([[0.0, 1.0]]), torch.tensor([[False, True]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_all_na_batch_gives_zero_loss():
    loss = build_loss("bce")(torch.randn(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0


def test_without_pos_weight_matches_torch_bce_on_fully_known_batch():
    logits, targets = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    ours = MaskedBCEWithLogits()(logits, targets, torch.ones(4, 3, dtype=torch.bool))
    assert torch.allclose(ours, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))


# ---------------------------------------------------------------- ASL and focal loss

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 4, generator=g) * 3
    targets = torch.randint(0, 2, (5, 4), generator=g).float()
    mask = torch.rand(5, 4, generator=g) > 0.3
    return logits, targets, mask


def value_and_grad(loss_fn, logits, targets, mask):
    logits = logits.clone().requires_grad_(True)
    loss = loss_fn(logits, targets, mask)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("loss_fn", [AsymmetricLoss(torch.tensor([2.0, 1.0, 0.5, 4.0]), gamma_neg=0, gamma_pos=0,
                                                    clip=0),
                                     FocalLoss(torch.tensor([2.0, 1.0, 0.5, 4.0]), gamma=0)])
def test_asl_and_focal_without_focusing_equal_masked_bce_value_and_gradient(loss_fn):
    logits, targets, mask = batch()
    bce_value, bce_grad = value_and_grad(MaskedBCEWithLogits(torch.tensor([2.0, 1.0, 0.5, 4.0])), logits, targets, mask)
    value, grad = value_and_grad(loss_fn, logits, targets, mask)
    assert torch.allclose(value, bce_value, rtol=1e-6)
    assert torch.allclose(grad, bce_grad, rtol=1e-5, atol=1e-8)


def test_asl_matches_hand_computation():
    # entry 1: negative, logit 0.5 -> p 0.6225, p_m = p - 0.05, weight p_m^4
    # entry 2: positive, logit -1, gamma_pos 1 -> weight (1 - p), pos_weight 3
    # entry 3: negative, logit -4 -> p 0.018 < clip: p_m 0, no loss at all
    # entry 4: NA
    logits = torch.tensor([[0.5, -1.0, -4.0, 7.0]])
    targets = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss_fn = AsymmetricLoss(torch.tensor([1.0, 3.0, 1.0, 1.0]), gamma_neg=4, gamma_pos=1, clip=0.05)
    loss = loss_fn(logits, targets, mask)
    p1, p2 = sigmoid(0.5) - 0.05, sigmoid(-1.0)
    expected = (-(p1**4) * math.log(1 - p1) - 3 * (1 - p2) * math.log(p2) + 0.0) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_asl_clipped_negative_has_no_loss_and_no_gradient():
    value, grad = value_and_grad(AsymmetricLoss(clip=0.05), torch.tensor([[-4.0]]), torch.tensor([[0.0]]),
                                 torch.tensor([[True]]))
    assert value.item() == 0.0 and grad.item() == 0.0


def test_focal_matches_hand_computation_with_alpha():
    logits = torch.tensor([[1.5, -0.5], [0.2, 2.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss = FocalLoss(gamma=2.0, alpha=0.25)(logits, targets, mask)
    pa, pb, pc = sigmoid(1.5), sigmoid(-0.5), sigmoid(0.2)
    expected = (-0.25 * (1 - pa) ** 2 * math.log(pa) - 0.75 * pb**2 * math.log(1 - pb)
                - 0.75 * pc**2 * math.log(1 - pc)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_detached_focal_weight_gives_the_constant_weight_gradient():
    x, clip = 0.3, 0.05
    p = sigmoid(x)
    p_m = p - clip
    args = (torch.tensor([[x]]), torch.tensor([[0.0]]), torch.tensor([[True]]))
    value, grad = value_and_grad(AsymmetricLoss(gamma_neg=4, clip=clip, detach_focal_weight=True), *args)
    full_value, full_grad = value_and_grad(AsymmetricLoss(gamma_neg=4, clip=clip), *args)
    # loss = -w * log(1 - p + clip) with w = p_m^4 held constant: dloss/dx = w * p (1 - p) / (1 - p + clip)
    assert math.isclose(grad.item(), p_m**4 * p * (1 - p) / (1 - p + clip), rel_tol=1e-5)
    # differentiating through w adds -4 p_m^3 p (1 - p) log(1 - p_m)
    extra = -4 * p_m**3 * p * (1 - p) * math.log(1 - p_m)
    assert math.isclose(full_grad.item(), grad.item() + extra, rel_tol=1e-5)
    assert value.item() == full_value.item() and torch.is_grad_enabled()


@pytest.mark.parametrize("name", ["bce", "asl", "focal"])
def test_na_entries_with_inf_or_nan_logits_give_no_loss_and_zero_gradient(name):
    logits, targets, mask = batch(1)
    loss_fn = build_loss(name, torch.full((4,), 2.0))
    clean_value, clean_grad = value_and_grad(loss_fn, logits, targets, mask)
    poisoned = logits.clone()
    poisoned[~mask] = torch.tensor([float("inf"), float("nan"), -float("inf")]).repeat(20)[: int((~mask).sum())]
    targets_poisoned = torch.where(mask, targets, torch.full_like(targets, float("nan")))
    value, grad = value_and_grad(loss_fn, poisoned, targets_poisoned, mask)
    assert (~mask).any() and torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == clean_value.item()
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert torch.equal(grad, clean_grad)


def test_soft_targets_weigh_the_two_terms_linearly():
    logits, mask = torch.tensor([[0.7]]), torch.tensor([[True]])
    loss_fn = AsymmetricLoss(gamma_neg=2, gamma_pos=1, clip=0.05)
    ones, zeros = loss_fn(logits, torch.ones(1, 1), mask), loss_fn(logits, torch.zeros(1, 1), mask)
    assert math.isclose(loss_fn(logits, torch.full((1, 1), 0.3), mask).item(),
                        0.3 * ones.item() + 0.7 * zeros.item(), rel_tol=1e-6)


def test_bad_loss_settings_are_clear_errors():
    with pytest.raises(AttrclfError, match="unknown loss 'hinge'"):
        build_loss("hinge")
    with pytest.raises(AttrclfError, match="clip"):
        build_loss("asl", clip=1.5)
    with pytest.raises(AttrclfError, match="alpha"):
        build_loss("focal", alpha=2.0)


# ---------------------------------------------------------------- --na-policy (training batches only)


def test_na_policy_ignore_keeps_the_mask_and_negative_makes_na_a_known_zero():
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    same_targets, same_mask = apply_na_policy(targets, mask, "ignore")
    assert torch.equal(same_targets, targets) and torch.equal(same_mask, mask)
    negative_targets, negative_mask = apply_na_policy(targets, mask, "negative")
    assert torch.equal(negative_targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert negative_mask.all()
    with pytest.raises(AttrclfError, match="--na-policy"):
        apply_na_policy(targets, mask, "positive")


def test_na_policies_are_the_ones_that_apply_na_policy_knows():
    targets, mask = torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])
    assert NA_POLICIES == ("ignore", "negative", "pseudo", "selective", "teacher", "fixmatch")
    for policy in NA_POLICIES:
        apply_na_policy(targets, mask, policy)


def test_detach_focal_weight_is_passed_by_name():
    with pytest.raises(TypeError):
        AsymmetricLoss(None, 4.0, 0.0, 0.05, True)


def test_attribute_average_is_the_mean_of_each_attributes_mean_over_known_labels():
    logits = torch.tensor([[0.0, 1.0, -2.0], [2.0, -1.0, 0.5], [1.5, 0.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, False, False]])
    entry = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    # attribute 0: three known labels, attribute 1: one, attribute 2: none (left out of the mean)
    expected = (entry[:, 0].mean() + entry[0, 1]) / 2
    loss = MaskedBCEWithLogits(average="attributes")(logits, targets, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    by_entry = MaskedBCEWithLogits()(logits, targets, mask)
    assert by_entry.item() == pytest.approx((entry[:, 0].sum() + entry[0, 1]).item() / 4, rel=1e-6)


def test_attribute_average_keeps_one_attributes_gradient_when_another_gains_labels():
    # labels added to attribute 1 (pseudo-labels, say) dilute attribute 0's gradient under "entries", not "attributes"
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.4], [-0.5, 0.1], [0.2, 0.9]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    few = torch.tensor([[True, True], [True, False], [True, False], [True, False]])
    many = torch.ones(4, 2, dtype=torch.bool)
    for average, same in (("attributes", True), ("entries", False)):
        loss_fn = MaskedBCEWithLogits(average=average)
        grads = [torch.autograd.grad(loss_fn(logits, targets, m), logits)[0][:, 0] for m in (few, many)]
        assert torch.allclose(grads[0], grads[1]) is same


def test_attribute_average_with_weights_and_with_asl_and_focal():
    logits = torch.tensor([[0.2, -1.0], [1.2, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, True]])
    weight = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (entry[:, 0].mean() + (0.5 * entry[0, 1] + entry[1, 1]) / 1.5) / 2
    assert MaskedBCEWithLogits(average="attributes")(logits, targets, mask, weight).item() == \
        pytest.approx(expected.item(), rel=1e-6)
    for loss_fn in (AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0, average="attributes"),
                    FocalLoss(gamma=0, average="attributes")):
        assert loss_fn(logits, targets, mask, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    assert MaskedBCEWithLogits(average="attributes")(logits, targets, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(AttrclfError, match="unknown loss average 'rows'"):
        MaskedBCEWithLogits(average="rows")
