"""--na-policy fixmatch: what the weak view is sure of becomes a pseudo-label learnt on the strong view (known answers
for the labels and the loss term), the strong view itself, the flags' checks, and that validation, thresholds and
counts see the real labels only."""

import copy
import json
import math

import pytest
import torch

from attrclf.config import TrainConfig, parse_args
from attrclf.device_augment import STRONG_CROP_SCALE, DeviceAugment, strong_view
from attrclf.engine import na_labeller
from attrclf.errors import AttrclfError
from attrclf.losses import MaskedBCEWithLogits, ViewPseudoLabels, apply_na_policy
from attrclf.model import AttrConfig

from .test_pseudo_labels import assert_validation_saw_real_labels, bce, run


def weak_batch():
    """Weak-view probabilities (pos_weight 1): row 0 all NA at 0.97, 0.5, 0.02; row 1 a known 0 at 0.99, then NA at
    0.95 and NaN."""
    probs = torch.tensor([[0.97, 0.5, 0.02], [0.99, 0.95, float("nan")]])
    mask = torch.tensor([[False, False, False], [True, False, False]])
    return probs.logit(), mask


def test_na_entries_sure_on_the_weak_view_become_pseudo_labels_and_known_entries_never_do():
    logits, mask = weak_batch()
    labeller = ViewPseudoLabels(threshold=0.95, weight=1.0, negatives_too=True)
    targets, pseudo = labeller.labels(logits, mask)
    # 0.97 and 0.95 positive, 0.02 negative; 0.5 undecided, the known 0.99 and the NaN stay out
    assert pseudo.tolist() == [[True, False, True], [False, True, False]]
    assert targets[pseudo].tolist() == [1.0, 0.0, 1.0]
    assert (labeller.positives, labeller.negatives) == (2, 1)


def test_the_threshold_reads_the_probability_with_pos_weight_taken_out():
    """With pos_weight 25 a raw 0.97 is a 56% chance (0.97 / (0.97 + 25 x 0.03)): not a pseudo-positive."""
    logits = torch.tensor([[0.97, 0.999]]).logit()
    targets, pseudo = ViewPseudoLabels(threshold=0.95, weight=1.0, pos_weight=torch.tensor([25.0, 25.0])).labels(
        logits, torch.zeros(1, 2, dtype=torch.bool))
    assert pseudo.tolist() == [[False, True]]  # 0.999 / (0.999 + 25 x 0.001) = 0.976


def test_the_term_is_the_strong_views_loss_over_the_batchs_na_entries_times_its_weight():
    logits, mask = weak_batch()
    strong = torch.tensor([[0.5, -1.0, 2.0], [3.0, -0.5, 0.0]], requires_grad=True)
    pos_weight = torch.tensor([2.0, 2.0, 2.0])
    # pos_weight 2 on the weak view: 0.97 -> 0.942 (out), 0.95 -> 0.905 (out); 0.02 -> 0.0101 (a negative)
    labeller = ViewPseudoLabels(threshold=0.9, weight=0.5, pos_weight=pos_weight, negatives_too=True,
                                weigh_positives=True)
    term = labeller.term(MaskedBCEWithLogits(pos_weight), logits, strong, mask)
    # pseudo: (0, 0) positive (0.942), (0, 2) negative, (1, 1) positive (0.905); 5 NA entries in the batch
    expected = 0.5 * (bce(0.5, 1, 2.0) + bce(2.0, 0) + bce(-0.5, 1, 2.0)) / 5
    assert math.isclose(term.item(), expected, rel_tol=1e-6)
    term.backward()
    assert strong.grad[1, 0].item() == 0.0 and strong.grad[0, 1].item() == 0.0  # known / undecided: no gradient
    assert logits.grad is None  # the weak view is a target, not a path


def test_positives_only_and_pseudo_positives_weighed_one():
    """The defaults: no pseudo-negative (--fixmatch-negatives makes them), and pos_weight taken back out of a
    pseudo-positive's loss, each weighing what a negative does (--fixmatch-pos-weight keeps it)."""
    logits, mask = weak_batch()
    strong = torch.tensor([[0.5, -1.0, 2.0], [3.0, -0.5, 0.0]])
    pos_weight = torch.tensor([4.0, 4.0, 4.0])
    labeller = ViewPseudoLabels(threshold=0.8, weight=1.0, pos_weight=pos_weight)
    targets, pseudo = labeller.labels(logits, mask)
    # pos_weight 4: 0.97 -> 0.89 (positive), 0.95 -> 0.83 (positive), 0.02 would be a negative: not made
    assert pseudo.tolist() == [[True, False, False], [False, True, False]] and labeller.negatives == 0
    term = labeller.term(MaskedBCEWithLogits(pos_weight), logits, strong, mask)
    assert math.isclose(term.item(), (bce(0.5, 1) + bce(-0.5, 1)) / 5, rel_tol=1e-6)
    weighted = ViewPseudoLabels(threshold=0.8, weight=1.0, pos_weight=pos_weight, weigh_positives=True)
    assert math.isclose(weighted.term(MaskedBCEWithLogits(pos_weight), logits, strong, mask).item(),
                        (bce(0.5, 1, 4.0) + bce(-0.5, 1, 4.0)) / 5, rel_tol=1e-6)


def test_without_a_sure_na_entry_the_term_is_zero_and_keeps_a_gradient_path():
    strong = torch.zeros(1, 2, requires_grad=True)
    term = ViewPseudoLabels(threshold=0.95, weight=1.0).term(MaskedBCEWithLogits(), torch.zeros(1, 2), strong,
                                                              torch.zeros(1, 2, dtype=torch.bool))
    assert term.item() == 0.0 and term.requires_grad


def test_the_strong_view_crops_and_jitters_the_same_rows_without_erasing():
    config = AttrConfig.for_backbone("test_resnet", ["a"], image_size=32)
    weak = DeviceAugment(config, (32, 32), hflip=0.5, color_jitter=0.3, random_erasing=0.25)
    strong = strong_view(weak)
    assert (strong.crop, strong.scale, strong.jitter, strong.erasing) == (True, (STRONG_CROP_SCALE, 1.0), 0.6, 0.0)
    assert (weak.crop, weak.jitter, weak.erasing) == (False, 0.3, 0.25)  # the weak view is left as it was
    assert strong_view(weak, 0.1).jitter == 0.3 and strong_view(weak, 0.5).jitter == 0.5  # never below the weak's
    # a black square in the bottom-right corner (8 x 8 of 32 x 32) on white stays in view however the crop falls: a
    # crop keeping 75% of the area cuts at most 1 - sqrt(0.75 x 3/4) = 25% of a side, 8 pixels
    pixels = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    pixels[:, :, 24:, 24:] = 0
    torch.manual_seed(0)
    out = strong(pixels)
    assert out.shape == (64, 3, 32, 32) and torch.isfinite(out).all()
    grey = out.mean(1).flatten(1)
    assert ((grey.max(1).values - grey.min(1).values) > 0.2).all()  # contrast 0.4 at least: never one flat colour
    geometry_only = copy.copy(strong)
    geometry_only.jitter = 0.0
    grey = geometry_only(pixels).mean(1).flatten(1)  # std 0.5: white 1, black -1
    assert (grey.max(1).values == 1.0).all() and (grey.min(1).values == -1.0).all()  # the black mark, in every crop


def test_fixmatch_flags_their_checks_and_the_labeller_from_the_first_fine_tuning_epoch():
    cfg = parse_args(["--na-policy", "fixmatch", "--fixmatch-threshold", "0.9", "--fixmatch-weight", "2"])
    assert (cfg.na_policy, cfg.fixmatch_threshold, cfg.fixmatch_weight) == ("fixmatch", 0.9, 2.0)
    defaults = parse_args([])
    assert (defaults.fixmatch_threshold, defaults.fixmatch_weight, defaults.fixmatch_negatives,
            defaults.fixmatch_pos_weight) == (0.95, 1.0, False, False)
    both = parse_args(["--na-policy", "fixmatch", "--fixmatch-negatives", "--fixmatch-pos-weight",
                       "--fixmatch-jitter", "0.3"])
    assert (both.fixmatch_negatives, both.fixmatch_pos_weight, both.fixmatch_jitter) == (True, True, 0.3)
    assert defaults.fixmatch_jitter == 0.6
    for changes, message in [({"fixmatch_threshold": 0.5}, "--fixmatch-threshold in"),
                             ({"fixmatch_weight": 0.0}, "--fixmatch-weight > 0"),
                             ({"fixmatch_jitter": 1.0}, "--fixmatch-jitter must be in"),
                             ({"mixup": 0.2}, "drop them"),
                             ({"augment_on": "loader"}, "drop --augment-on loader")]:
        with pytest.raises(AttrclfError, match=message):
            TrainConfig(na_policy="fixmatch", **changes).resolve()
    with pytest.raises(AttrclfError, match="fixmatch makes two views"):
        TrainConfig(data="shards/*.tar", na_policy="fixmatch", max_steps=10).resolve()
    resolved = TrainConfig(data="x", backbone_weights="w", na_policy="fixmatch", head_epochs=2, epochs=4).resolve()
    pos_weight = torch.tensor([2.0, 3.0])
    assert na_labeller(resolved, 1, None, pos_weight) is None  # the head stage
    labeller = na_labeller(resolved, 2, None, pos_weight)
    assert isinstance(labeller, ViewPseudoLabels) and labeller.pos_weight is pos_weight
    assert (labeller.threshold, labeller.weight, labeller.negatives_too, labeller.weigh_positives) == (
        0.95, 1.0, False, False)
    both = TrainConfig(data="x", backbone_weights="w", na_policy="fixmatch", fixmatch_negatives=True,
                       fixmatch_pos_weight=True, epochs=4).resolve()
    labeller = na_labeller(both, 3, None, pos_weight)
    assert (labeller.negatives_too, labeller.weigh_positives) == (True, True)
    plain, known = torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])
    assert apply_na_policy(plain, known, "fixmatch") == (plain, known)


def test_fixmatch_labels_never_reach_validation_thresholds_or_counts(tmp_path, tiny_data, monkeypatch):
    data, model, result, metrics, labellers = run(tiny_data, tmp_path / "fixmatch", monkeypatch,
                                                  na_policy="fixmatch", fixmatch_threshold=0.51,
                                                  fixmatch_negatives=True)
    # one labeller per fine-tuning epoch, each of which labelled NA entries (a threshold of 0.51 takes nearly all)
    assert len(labellers) == 2 and all(lab.positives + lab.negatives > 0 for lab in labellers)
    assert_validation_saw_real_labels(data, result, tmp_path / "fixmatch")
    saved = json.loads((tmp_path / "fixmatch" / "metrics.json").read_text())
    assert saved["na_policy"] == {"policy": "fixmatch", "fixmatch_threshold": 0.51, "fixmatch_weight": 1.0,
                                  "fixmatch_negatives": True, "fixmatch_pos_weight": False, "fixmatch_jitter": 0.6}
    card = (tmp_path / "fixmatch" / "README.md").read_text()
    assert "`--na-policy fixmatch`, FixMatch (Sohn et al., NeurIPS 2020) entry by entry" in card
    assert ("at least 0.51 became a pseudo-positive and at most 0.49 a pseudo-negative on the strong view, each "
            "weighing 1 (the positive weight left out);") in card
    assert "keeping at least 75% of the image, colour jitter 0.6, no erasing" in card


def test_the_card_names_positives_only_and_pseudo_positives_weighing_one():
    from attrclf.card import na_procedure

    line = na_procedure({"na_policy": "fixmatch", "fixmatch_threshold": 0.9, "fixmatch_weight": 2.0,
                         "fixmatch_negatives": False, "fixmatch_pos_weight": False})
    assert ("at least 0.9 became a pseudo-positive (no pseudo-negatives) on the strong view, each weighing 1 (the "
            "positive weight left out); their loss, over the batch's NA entries, was added with weight 2") in line
