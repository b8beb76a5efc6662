"""--na-policy pseudo: which NA entries become pseudo-labels, their weight in the loss, and that validation, the
threshold search and every count see the real labels only."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from attrclf import engine
from attrclf.config import TrainConfig, parse_args
from attrclf.engine import build_model, evaluate, fit, na_labeller
from attrclf.errors import AttrclfError
from attrclf.labels import label_counts, training_counts
from attrclf.loader import make_loader
from attrclf.losses import (
    AsymmetricLoss,
    FocalLoss,
    MaskedBCEWithLogits,
    PseudoLabeller,
    apply_na_policy,
    unweighted_probs,
)
from attrclf.metrics import mean_average_precision, tune_thresholds
from attrclf.reporting import finalize, write_outputs
from attrclf.transforms import eval_transform

from .conftest import tiny_config, tiny_split


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def bce(logit_value, target, pos_weight=1.0):
    p = 1 / (1 + math.exp(-logit_value))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


def hand_batch():
    """Row 0: NA at p 0.01, 0.03, 0.5; row 1: NA at p 0.98, 0.96, and known entries the model contradicts."""
    probs = torch.tensor([[0.01, 0.03, 0.5, 0.999], [0.98, 0.96, 0.001, 0.7]])
    logits = probs.logit()
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    mask = torch.tensor([[False, False, False, True], [False, False, True, True]])
    return logits, targets, mask


# ---------------------------------------------------------------- the labeller and its curriculum


def test_curriculum_thresholds_relax_linearly_to_the_flags():
    first = PseudoLabeller.for_epoch(0, 4, low=0.05, high=0.95, weight=0.5)
    second = PseudoLabeller.for_epoch(1, 4, low=0.05, high=0.95, weight=0.5)
    last = PseudoLabeller.for_epoch(3, 4, low=0.05, high=0.95, weight=0.5)
    assert (first.low, first.high) == pytest.approx((0.0125, 0.9875))
    assert (second.low, second.high) == pytest.approx((0.025, 0.975))
    assert (last.low, last.high) == pytest.approx((0.05, 0.95)) and last.weight == 0.5


def test_which_na_entries_become_pseudo_labels_at_a_given_epoch_and_known_entries_stay():
    logits, targets, mask = hand_batch()
    # epoch 2 of 4: p <= 0.025 -> pseudo-negative, p >= 0.975 -> pseudo-positive
    labeller = PseudoLabeller.for_epoch(1, 4, low=0.05, high=0.95, weight=0.5)
    new_targets, new_mask, weight = labeller(logits, targets, mask)
    assert new_mask.tolist() == [[True, False, False, True], [True, False, True, True]]
    assert new_targets.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]]
    assert weight.tolist() == [[0.5, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]]
    assert (labeller.negatives, labeller.positives) == (1, 1)
    # the known entries the model contradicts (p 0.999 for a 0, p 0.001 for a 1) keep their labels and weight 1
    assert new_targets[mask].tolist() == targets[mask].tolist() and (weight[mask] == 1).all()
    # the last epoch: p <= 0.05 and p >= 0.95, so 0.03 and 0.96 join; 0.5 never does
    last = PseudoLabeller.for_epoch(3, 4, low=0.05, high=0.95, weight=0.5)
    new_targets, new_mask, weight = last(logits, targets, mask)
    assert new_mask.tolist() == [[True, True, False, True], [True, True, True, True]]
    assert new_targets.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert weight.tolist() == [[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]


def test_thresholds_apply_to_probabilities_with_the_pos_weight_taken_out():
    # one attribute with pos_weight 25: raw p 0.95 is q = 0.95 / (0.95 + 25 * 0.05) = 0.43 unweighted, no
    # pseudo-positive; raw p 0.999 is q = 0.9756; raw p 0.5 is q = 1 / 26 = 0.038, a pseudo-negative at low 0.05
    probs = torch.tensor([[0.95], [0.999], [0.5], [0.7]])
    targets, mask = torch.zeros(4, 1), torch.zeros(4, 1, dtype=torch.bool)
    labeller = PseudoLabeller(low=0.05, high=0.95, weight=0.5, pos_weight=torch.tensor([25.0]))
    new_targets, new_mask, _ = labeller(probs.logit(), targets, mask)
    assert new_mask.flatten().tolist() == [False, True, True, False]  # q 0.43 and q 0.085 stay NA
    assert new_targets.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    assert unweighted_probs(probs.logit(), torch.tensor([25.0])).flatten().tolist() == pytest.approx(
        [0.95 / (0.95 + 25 * 0.05), 0.999 / (0.999 + 25 * 0.001), 1 / 26, 0.7 / (0.7 + 25 * 0.3)])
    unweighted = PseudoLabeller(low=0.05, high=0.95, weight=0.5)  # without pos_weight the raw p decides
    assert unweighted(probs.logit(), targets, mask)[1].flatten().tolist() == [True, True, False, False]
    cfg = TrainConfig(data="x", backbone_weights="w", na_policy="pseudo", head_epochs=0, epochs=2).resolve()
    assert na_labeller(cfg, 0, pos_weight=torch.tensor([25.0])).pos_weight.tolist() == [25.0]

def test_pseudo_labels_carry_no_gradient_of_their_own_and_nan_stays_na():
    logits, targets, mask = hand_batch()
    logits = logits.clone().requires_grad_(True)
    labeller = PseudoLabeller(low=0.05, high=0.95, weight=0.5)
    new_targets, new_mask, weight = labeller(logits, targets, mask)
    assert not new_targets.requires_grad and not weight.requires_grad
    MaskedBCEWithLogits()(logits, new_targets, new_mask, weight).backward()
    assert logits.grad[0, 2] == 0  # p 0.5: still NA, so no gradient
    nan_logits = torch.tensor([[float("nan")]])
    assert not labeller(nan_logits, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool))[1].any()


def test_the_labeller_acts_only_from_the_first_fine_tuning_epoch():
    cfg = TrainConfig(data="x", backbone_weights="w", na_policy="pseudo", head_epochs=2, epochs=6).resolve()
    assert na_labeller(cfg, 0) is None and na_labeller(cfg, 1) is None  # the head stage
    assert (na_labeller(cfg, 2).low, na_labeller(cfg, 2).high) == pytest.approx((0.0125, 0.9875))
    assert (na_labeller(cfg, 5).low, na_labeller(cfg, 5).high) == pytest.approx((0.05, 0.95))
    assert na_labeller(TrainConfig(data="x", backbone_weights="w", head_epochs=2, epochs=6).resolve(), 5) is None
    head_only = TrainConfig(data="x", backbone_weights="w", na_policy="pseudo", unfreeze_stages="0").resolve()
    assert na_labeller(head_only, 5) is None


def test_pseudo_policy_keeps_na_out_of_the_batch_and_pos_weight_counts_known_labels_only():
    targets, mask = torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])
    assert apply_na_policy(targets, mask, "pseudo") == (targets, mask)
    labels = [[1, None], [0, None], [1, 0]]
    assert training_counts(labels, 2, "pseudo") == label_counts(labels, 2)


def test_pseudo_flags_and_their_checks():
    cfg = parse_args(["--na-policy", "pseudo", "--pseudo-low", "0.1", "--pseudo-high", "0.8", "--pseudo-weight", "0.3"])
    assert (cfg.na_policy, cfg.pseudo_low, cfg.pseudo_high, cfg.pseudo_weight) == ("pseudo", 0.1, 0.8, 0.3)
    defaults = parse_args([])
    assert (defaults.na_policy, defaults.pseudo_low, defaults.pseudo_high, defaults.pseudo_weight) == (
        "ignore", 0.05, 0.95, 0.5)
    for bad in ({"pseudo_low": 0.6, "pseudo_high": 0.4}, {"pseudo_weight": 0.0}, {"pseudo_high": 1.5}):
        with pytest.raises(AttrclfError, match="--pseudo-low < --pseudo-high"):
            TrainConfig(na_policy="pseudo", **bad).resolve()


# ---------------------------------------------------------------- the weighted losses


def test_weighted_bce_is_the_hand_computed_weighted_mean_over_the_entries_in_the_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weight = torch.tensor([[1.0, 0.5, 1.0], [0.5, 1.0, 0.5]])  # [1, 2] is NA: its weight must not count
    pos_weight = torch.tensor([2.0, 1.0, 4.0])
    loss = MaskedBCEWithLogits(pos_weight)(logits, targets, mask, weight)
    terms = [(1.0, bce(2.0, 1, 2.0)), (0.5, bce(-1.0, 0, 1.0)), (1.0, bce(0.5, 1, 4.0)), (0.5, bce(0.0, 0, 2.0)),
             (1.0, bce(3.0, 1, 1.0))]
    expected = sum(w * value for w, value in terms) / sum(w for w, _ in terms)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    unweighted = MaskedBCEWithLogits(pos_weight)(logits, targets, mask)
    ones = MaskedBCEWithLogits(pos_weight)(logits, targets, mask, torch.ones(2, 3))
    assert torch.allclose(ones, unweighted, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_fn", [AsymmetricLoss(torch.tensor([2.0, 1.0])), FocalLoss(gamma=2.0, alpha=0.25)])
def test_weighted_asl_and_focal_are_weighted_means_of_their_per_entry_losses(loss_fn):
    logits = torch.tensor([[1.5, -0.5], [-2.0, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    weight = torch.tensor([[1.0, 0.5], [0.25, 1.0]])
    entries = ((0, 0), (0, 1), (1, 0))

    def alone(i, j):  # the loss of entry (i, j) alone: a mask with only it known
        only = torch.zeros(2, 2, dtype=torch.bool)
        only[i, j] = True
        return loss_fn(logits, targets, only)

    per_entry = torch.stack([alone(i, j) for i, j in entries])
    w = torch.tensor([1.0, 0.5, 0.25])
    expected = (w * per_entry).sum() / w.sum()
    assert torch.allclose(loss_fn(logits, targets, mask, weight), expected, rtol=1e-6)


def test_all_na_weighted_batch_gives_zero_loss():
    loss = MaskedBCEWithLogits()(torch.randn(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool),
                                 torch.full((2, 3), 0.5))
    assert loss.item() == 0.0


# ---------------------------------------------------------------- a real run: pseudo-labels stay in training


def run(tiny_data, output_dir, monkeypatch, **changes):
    """A tiny run (a head epoch on cached features, then 2 fine-tuning epochs); returns what it made and left."""
    labellers = []

    def spy(*args, **kwargs):
        labeller = real(*args, **kwargs)
        labellers.append(labeller)
        return labeller

    real = engine.na_labeller
    monkeypatch.setattr(engine, "na_labeller", spy)
    data = tiny_split(tiny_data)
    changes = {"head_feature_cache": True, **changes}
    cfg = tiny_config(tiny_data, output_dir, epochs=3, head_epochs=1, unfreeze_stages="all", keep_checkpoints=0,
                      **changes)
    torch.manual_seed(0)
    model = build_model(cfg, data.label_names)
    accelerator = Accelerator(cpu=True)
    result = fit(model, data, cfg, accelerator)
    metrics = finalize(model, result, data, cfg)
    write_outputs(model, metrics, result, cfg=cfg, output_dir=Path(output_dir))
    monkeypatch.setattr(engine, "na_labeller", real)
    return data, model, result, metrics, labellers


def assert_validation_saw_real_labels(data, result, output_dir=None):
    """The best epoch's validation output is the dataset's (its mask the known mask, its targets the real ones) and,
    with `output_dir`, metrics.json's validation counts are the real labels'; returns (real targets, real mask)."""
    real_mask = np.array([[v is not None for v in row] for row in data.validation["labels"]])
    real_targets = np.array([[v or 0 for v in row] for row in data.validation["labels"]], dtype=np.float32)
    assert (~real_mask).any()  # attribute c has NA in validation
    np.testing.assert_array_equal(result.best.mask, real_mask)
    np.testing.assert_array_equal(result.best.targets[real_mask], real_targets[real_mask])
    if output_dir is not None:
        saved = json.loads((output_dir / "metrics.json").read_text())
        assert saved["data"]["validation_counts"] == label_counts(data.validation["labels"], 3).by_attribute(
            data.label_names)
    return real_targets, real_mask


def test_pseudo_labels_never_reach_validation_thresholds_or_counts(tmp_path, tiny_data, monkeypatch):
    # --pseudo-low 0.98: in the last fine-tuning epoch nearly every NA entry of a training batch is a pseudo-label
    data, model, result, metrics, labellers = run(tiny_data, tmp_path / "pseudo", monkeypatch, na_policy="pseudo",
                                                  pseudo_low=0.98, pseudo_high=0.99)
    # one labeller per fine-tuning epoch (the head epoch trains on cached features, with NA left out)
    assert len(labellers) == 2 and labellers[-1].negatives + labellers[-1].positives > 0
    real_targets, real_mask = assert_validation_saw_real_labels(data, result)
    # thresholds and mAP: what the real labels give on a fresh pass of the saved weights
    loader = make_loader(data.validation, eval_transform(model.config), 8, False)
    fresh = evaluate(model, loader, engine.build_loss("bce"), Accelerator(cpu=True))
    np.testing.assert_allclose(fresh.probs, result.best.probs, atol=1e-6)
    assert model.config.thresholds == tune_thresholds(result.best.probs, real_targets, real_mask, rule="half-f1",
                                                      pos_weight=result.pos_weight)
    assert metrics["validation"]["mAP"] == pytest.approx(mean_average_precision(fresh.probs, real_targets, real_mask))
    # counts: the data's real labels, in metrics.json and per attribute of the validation table
    saved = json.loads((tmp_path / "pseudo" / "metrics.json").read_text())
    counts = label_counts(data.validation["labels"], 3).by_attribute(data.label_names)
    assert saved["data"]["validation_counts"] == counts
    assert saved["data"]["train_counts"] == label_counts(data.train["labels"], 3).by_attribute(data.label_names)
    for name, row in saved["validation"]["per_attribute"].items():
        assert (row["positives"], row["negatives"], row["na"]) == tuple(counts[name].values())
    assert saved["na_policy"] == {"policy": "pseudo", "pseudo_low": 0.98, "pseudo_high": 0.99, "pseudo_weight": 0.5}
    card = (tmp_path / "pseudo" / "README.md").read_text()
    assert "`--na-policy pseudo`, curriculum pseudo-labelling (Durand et al., CVPR 2019)" in card
    assert "at most 0.98 became a pseudo-negative and at least 0.99 a pseudo-positive, with loss weight 0.5" in card

    # the same seed with --na-policy ignore: the head epoch is the same to the bit, the fine-tuning differs
    _, _, ignored, ignored_metrics, _ = run(tiny_data, tmp_path / "ignore", monkeypatch)
    epochs, ignored_epochs = result.history.epochs, ignored.history.epochs
    assert (epochs[0].train_loss, epochs[0].val_loss) == (ignored_epochs[0].train_loss, ignored_epochs[0].val_loss)
    assert epochs[-1].train_loss != ignored_epochs[-1].train_loss
    np.testing.assert_array_equal(ignored.best.mask, real_mask)
    assert ignored_metrics["data"]["validation_counts"] == counts and ignored_metrics["na_policy"] == {
        "policy": "ignore"}
    ignore_card = (tmp_path / "ignore" / "README.md").read_text()
    assert "`--na-policy ignore`: NA left out of the loss" in ignore_card
    assert "--warm-bn-stats" not in ignore_card  # the head stage trained on cached features: nothing to warm
