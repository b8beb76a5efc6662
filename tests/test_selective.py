"""--na-policy selective: which NA entries become weighted negatives (the attribute's prior and the model's own
probability decide), their weight in the loss, and that validation, thresholds and counts see the real labels only."""

import json
import math

import pytest
import torch

from attrclf.config import TrainConfig, parse_args
from attrclf.engine import na_labeller
from attrclf.errors import AttrclfError
from attrclf.labels import label_counts, training_counts
from attrclf.losses import MaskedBCEWithLogits, SelectiveNegatives, apply_na_policy

from .test_pseudo_labels import assert_validation_saw_real_labels, bce, run


def hand_batch():
    """Attributes a, b rare (priors 0.1, 0.3), c common (0.6). Row 0 all NA at p 0.2, 0.7, 0.1; row 1: a known
    positive at p 0.9, b NA at p 0.49, c NA at p 0.5."""
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.9, 0.49, 0.5]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, False, False], [True, False, False]])
    return probs.logit(), targets, mask


def test_rare_unlikely_na_entries_become_weighted_negatives_and_the_rest_stay_na():
    logits, targets, mask = hand_batch()
    labeller = SelectiveNegatives(torch.tensor([0.1, 0.3, 0.6]), max_prior=0.3, likely=0.5, weight=0.25)
    new_targets, new_mask, weight = labeller(logits, targets, mask)
    # (0, a) p 0.2 and (1, b) p 0.49: rare and unlikely -> negatives; (0, b) p 0.7: likely present -> NA;
    # c: prior 0.6 > 0.3 -> NA whatever the probability; (1, a) known: unchanged, weight 1
    assert new_mask.tolist() == [[True, False, False], [True, True, False]]
    assert new_targets.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert weight[new_mask].tolist() == [0.25, 1.0, 0.25]
    assert (labeller.negatives, labeller.ignored) == (2, 3)


def test_the_weighted_loss_with_selective_negatives_is_the_hand_computed_mean():
    logits, targets, mask = hand_batch()
    labeller = SelectiveNegatives(torch.tensor([0.1, 0.3, 0.6]), max_prior=0.3, likely=0.5, weight=0.25)
    loss = MaskedBCEWithLogits(torch.tensor([4.0, 1.0, 1.0]))(logits, *labeller(logits, targets, mask))
    terms = [(0.25, bce(logits[0, 0].item(), 0)), (1.0, bce(logits[1, 0].item(), 1, 4.0)),
             (0.25, bce(logits[1, 1].item(), 0))]
    assert math.isclose(loss.item(), sum(w * v for w, v in terms) / sum(w for w, _ in terms), rel_tol=1e-6)


def test_the_labeller_is_detached_and_a_nan_probability_stays_na():
    logits = torch.tensor([[float("nan"), -3.0]], requires_grad=True)
    _, mask, _ = SelectiveNegatives(torch.tensor([0.1, 0.1]), max_prior=0.3, likely=0.5, weight=0.5)(
        logits, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert mask.tolist() == [[False, True]] and not mask.requires_grad


def test_priors_count_known_labels_only_and_the_policy_keeps_na_out_of_the_batch():
    labels = [[1, None, 0], [0, None, None], [0, 1, None], [1, 0, None]]
    assert label_counts(labels, 3).positive_share == pytest.approx([0.5, 0.5, 0.0])
    targets, mask = torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])
    assert apply_na_policy(targets, mask, "selective") == (targets, mask)
    assert training_counts(labels, 3, "selective") == label_counts(labels, 3)


def test_selective_flags_their_checks_and_the_labeller_in_every_epoch():
    cfg = parse_args(["--na-policy", "selective", "--selective-max-prior", "0.2", "--selective-likely", "0.4",
                      "--selective-weight", "1"])
    assert (cfg.selective_max_prior, cfg.selective_likely, cfg.selective_weight) == (0.2, 0.4, 1.0)
    defaults = parse_args([])
    assert (defaults.selective_max_prior, defaults.selective_likely, defaults.selective_weight) == (0.3, 0.5, 0.5)
    for bad in ({"selective_weight": 0.0}, {"selective_likely": 1.5}, {"selective_max_prior": -0.1}):
        with pytest.raises(AttrclfError, match="--na-policy selective needs"):
            TrainConfig(na_policy="selective", **bad).resolve()
    resolved = TrainConfig(data="x", backbone_weights="w", na_policy="selective", head_epochs=2, epochs=4).resolve()
    priors = torch.tensor([0.1, 0.5])
    for epoch in (0, 3):  # the head stage too: the choice needs no curriculum
        labeller = na_labeller(resolved, epoch, priors)
        assert isinstance(labeller, SelectiveNegatives) and labeller.priors is priors


def test_selective_negatives_never_reach_validation_thresholds_or_counts(tmp_path, tiny_data, monkeypatch):
    # --selective-max-prior 1 --selective-likely 1: every NA entry of a training batch becomes a negative
    data, model, result, metrics, labellers = run(
        tiny_data, tmp_path / "selective", monkeypatch, na_policy="selective", selective_max_prior=1.0,
        selective_likely=1.0, head_feature_cache=False)
    assert len(labellers) == 3 and all(labeller.negatives > 0 for labeller in labellers)
    assert_validation_saw_real_labels(data, result, tmp_path / "selective")
    saved = json.loads((tmp_path / "selective" / "metrics.json").read_text())
    assert saved["na_policy"] == {"policy": "selective", "selective_max_prior": 1.0, "selective_likely": 1.0,
                                  "selective_weight": 0.5}
    card = (tmp_path / "selective" / "README.md").read_text()
    assert "`--na-policy selective`, selective negatives after CSL (Ben-Baruch et al., CVPR 2022)" in card
    assert "counted as a negative with loss weight 0.5" in card
    # the default --warm-bn-stats, with a head stage that runs the backbone on every batch
    assert "already followed the data in the head stage (--warm-bn-stats)" in card
