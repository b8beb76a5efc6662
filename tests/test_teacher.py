"""--na-policy teacher: the weight average's probabilities as soft, certainty-weighted targets for NA entries, the
correction for pos_weight, and that validation, thresholds and counts see the real labels only."""

import json
import math

import numpy as np
import pytest
import torch

from attrclf.config import TrainConfig, parse_args
from attrclf.engine import na_labeller
from attrclf.errors import AttrclfError
from attrclf.losses import MaskedBCEWithLogits, TeacherTargets, apply_na_policy

from .test_pseudo_labels import assert_validation_saw_real_labels, bce, run


def hand_batch():
    """Teacher probabilities: row 0 all NA at 0.9, 0.5, 0.2; row 1 a known positive the teacher doubts (0.3), then NA
    at 0.8 and NaN."""
    teacher = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.8, float("nan")]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, False, False], [True, False, False]])
    return teacher.logit(), targets, mask


def test_na_entries_take_the_teachers_probability_weighted_by_its_certainty():
    logits, targets, mask = hand_batch()
    labeller = TeacherTargets(weight=0.5)
    new_targets, new_mask, weight = labeller(logits, targets, mask)
    assert new_mask.tolist() == [[True, True, True], [True, True, False]]  # the NaN stays NA
    np.testing.assert_allclose(new_targets[new_mask].tolist(), [0.9, 0.5, 0.2, 1.0, 0.8], atol=1e-6)  # known: kept
    # weight 0.5 x |2p - 1|: 0.4, 0 (an undecided teacher adds nothing), 0.3; the known label weighs 1
    np.testing.assert_allclose(weight[new_mask].tolist(), [0.4, 0.0, 0.3, 1.0, 0.3], atol=1e-6)
    assert labeller.labelled == 4 and labeller.confidence == pytest.approx(0.8 + 0.0 + 0.6 + 0.6)


def test_the_weighted_loss_is_the_hand_computed_mean_with_soft_targets():
    logits, targets, mask = hand_batch()
    student = torch.tensor([[1.0, -2.0, 0.5], [2.0, 0.0, 3.0]])
    loss = MaskedBCEWithLogits()(student, *TeacherTargets(weight=0.5)(logits, targets, mask))
    terms = [(0.4, bce(1.0, 0.9)), (0.0, bce(-2.0, 0.5)), (0.3, bce(0.5, 0.2)), (1.0, bce(2.0, 1)),
             (0.3, bce(0.0, 0.8))]
    assert math.isclose(loss.item(), sum(w * v for w, v in terms) / sum(w for w, _ in terms), rel_tol=1e-6)


@pytest.mark.parametrize("pos_weight", [1.0, 4.0, 30.0])
def test_with_pos_weight_the_loss_is_smallest_where_the_student_agrees_with_the_teacher(pos_weight):
    """The target is corrected so that the weighted BCE's minimum is at the teacher's own probability: without the
    correction the student (and then the teacher) would drift towards positive."""
    teacher = torch.tensor([[0.8, 0.1, 0.02]]).logit()
    weights = torch.full((3,), pos_weight)
    targets, mask, weight = TeacherTargets(weight=1.0, pos_weight=weights)(
        teacher, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    if pos_weight == 4.0:
        assert targets[0, 0].item() == pytest.approx(0.8 / (0.8 + 4 * 0.2))  # = 0.5
    student = teacher.clone().requires_grad_(True)
    loss_fn = MaskedBCEWithLogits(weights)
    loss_fn(student, targets, mask, weight).backward()
    assert student.grad.abs().max().item() < 1e-6  # a stationary point at the teacher's logits


def test_the_labeller_is_detached_and_the_policy_keeps_na_out_of_the_batch():
    logits = torch.tensor([[2.0, -3.0]], requires_grad=True)
    targets, mask, weight = TeacherTargets(weight=0.5)(logits, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert not (targets.requires_grad or weight.requires_grad)
    plain, known = torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])
    assert apply_na_policy(plain, known, "teacher") == (plain, known)


def test_teacher_flags_their_checks_and_the_labeller_in_every_epoch():
    cfg = parse_args(["--na-policy", "teacher", "--teacher-weight", "1"])
    assert (cfg.na_policy, cfg.teacher_weight) == ("teacher", 1.0)
    assert parse_args([]).teacher_weight == 0.5
    with pytest.raises(AttrclfError, match="--teacher-weight must be in"):
        TrainConfig(na_policy="teacher", teacher_weight=0.0).resolve()
    with pytest.raises(AttrclfError, match="--na-policy teacher needs the weight average"):
        TrainConfig(na_policy="teacher", ema_decay=0.0).resolve()
    resolved = TrainConfig(data="x", backbone_weights="w", na_policy="teacher", head_epochs=2, epochs=4).resolve()
    pos_weight = torch.tensor([2.0, 3.0])
    for epoch in (0, 3):  # the head stage too
        labeller = na_labeller(resolved, epoch, None, pos_weight)
        assert isinstance(labeller, TeacherTargets) and labeller.pos_weight is pos_weight


def test_teacher_targets_never_reach_validation_thresholds_or_counts(tmp_path, tiny_data, monkeypatch):
    data, model, result, metrics, labellers = run(tiny_data, tmp_path / "teacher", monkeypatch, na_policy="teacher",
                                                  teacher_weight=1.0, head_feature_cache=False,
                                                  switch_warmup_head=False)
    assert len(labellers) == 3 and all(labeller.labelled > 0 for labeller in labellers)
    assert all(labeller.pos_weight is not None for labeller in labellers)
    assert_validation_saw_real_labels(data, result, tmp_path / "teacher")
    saved = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert saved["na_policy"] == {"policy": "teacher", "teacher_weight": 1.0}
    card = (tmp_path / "teacher" / "README.md").read_text()
    assert "`--na-policy teacher`, a mean teacher (Tarvainen & Valpola, NeurIPS 2017)" in card
    assert "with loss weight 1 x |2p - 1| (known labels 1)" in card
    # --no-switch-warmup-head, named in the same card's stages
    assert "the backbone's (the head kept its schedule) warmed up linearly over 1.0 epoch(s) after the switch" in card


def test_each_na_labeller_sums_its_tallies_into_one_log_line():
    """report_na_labels sums `tallies()` over processes and prints `summary` (here: two processes' tallies)."""
    from attrclf.losses import PseudoLabeller, SelectiveNegatives

    teacher = TeacherTargets(weight=0.5, labelled=10, confidence=4.0)
    pseudo = PseudoLabeller(low=0.05, high=0.95, weight=0.5, positives=3, negatives=7)
    selective = SelectiveNegatives(torch.tensor([0.1]), max_prior=0.3, likely=0.5, weight=0.5, negatives=4, ignored=2)
    twice = [(torch.tensor(lab.tallies()) * 2).tolist() for lab in (teacher, pseudo, selective)]
    assert teacher.summary(twice[0]) == ("  teacher NA this epoch: 20 soft target(s), mean certainty 0.400 "
                                         "(weight 0.5 x certainty)")
    assert pseudo.summary(twice[1]) == "  pseudo-labels this epoch: 14 negative(s) at p <= 0.0500, 6 positive(s) at " \
                                       "p >= 0.9500 (NA entries of training batches, weight 0.5)"
    assert selective.summary(twice[2]) == "  selective NA this epoch: 8 counted as negative (weight 0.5), 4 left out " \
                                          "(a common attribute, or p >= 0.5)"
