import math

import torch

from attrclf.losses import MaskedBCEWithLogits, build_loss


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
