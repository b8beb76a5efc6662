import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score
from sklearn.metrics import precision_recall_curve as sklearn_pr_curve

from attrclf.metrics import (
    average_precision,
    best_f1_threshold,
    evaluate_predictions,
    precision_recall_curve,
    tune_thresholds,
)


@pytest.mark.parametrize(
    "scores, labels",
    [
        ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1]),
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
        ([0.5, 0.5, 0.5, 0.2, 0.9], [1, 0, 1, 0, 0]),  # ties
        ([0.3, 0.3, 0.3], [1, 0, 0]),
    ],
)
def test_average_precision_equals_sklearn(scores, labels):
    scores, labels = np.array(scores), np.array(labels)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_precision_recall_curve_by_hand():
    # ranked 1, 0, then a tie of 1 and 0 at 0.4: one point per distinct score, highest first
    precision, recall, thresholds = precision_recall_curve(np.array([0.9, 0.7, 0.4, 0.4]), np.array([1, 0, 1, 0]))
    assert thresholds.tolist() == [0.9, 0.7, 0.4]
    assert precision.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert recall.tolist() == pytest.approx([0.5, 0.5, 1.0])
    sk_precision, sk_recall, sk_thresholds = sklearn_pr_curve([1, 0, 1, 0], [0.9, 0.7, 0.4, 0.4])
    assert sk_thresholds[::-1].tolist() == thresholds.tolist()  # scikit-learn's points, reversed, without (1, 0)
    assert sk_precision[-2::-1] == pytest.approx(precision) and sk_recall[-2::-1] == pytest.approx(recall)


def test_average_precision_by_hand():
    # ranks: 1 (P=1/1), 0, 1 (P=2/3): AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision(np.array([0.9, 0.5, 0.1]), np.array([1, 0, 1])) == pytest.approx(0.5 + 1 / 3)


def test_average_precision_random_against_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        labels[0] = 1
        scores = np.round(rng.random(50), 1)  # many ties
        assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_best_threshold_by_hand():
    scores = np.array([0.95, 0.8, 0.6, 0.4, 0.3, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 0])
    # cutting after 0.4 gives tp=3 fp=1 fn=0 -> F1 6/7, the best; halfway to the next score 0.3
    assert best_f1_threshold(scores, labels) == pytest.approx(0.35)
    assert best_f1_threshold(scores, np.zeros(6)) == 0.5  # nothing to tune


def test_tuned_thresholds_maximise_f1_like_a_brute_force_search():
    rng = np.random.default_rng(1)
    probs = rng.random((80, 3))
    targets = (rng.random((80, 3)) < probs).astype(int)
    mask = rng.random((80, 3)) > 0.2
    thresholds = tune_thresholds(probs, targets, mask)
    for a, t in enumerate(thresholds):
        known = mask[:, a]
        ours = f1_score(targets[known, a], probs[known, a] >= t)
        brute = max(f1_score(targets[known, a], probs[known, a] >= c) for c in np.unique(probs[known, a]))
        assert ours == pytest.approx(brute)


def test_metrics_skip_na_and_single_class_attributes():
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.8], [0.8, 0.4, 0.9], [0.3, 0.9, 0.6]])
    targets = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)
    result = evaluate_predictions(probs, targets, mask, ["a", "b", "c"])
    # c has only positives: no AP in mAP, not "evaluated"
    assert result["evaluated_attributes"] == ["a", "b"]
    assert result["per_attribute"]["b"]["na"] == 1
    known = mask[:, 1]
    ap_b = average_precision_score(targets[known, 1], probs[known, 1])
    assert result["mAP"] == pytest.approx((1.0 + ap_b) / 2)
    # changing a target under NA changes nothing
    flipped = targets.copy()
    flipped[1, 1] = 0
    assert evaluate_predictions(probs, flipped, mask, ["a", "b", "c"]) == result


def test_f1_at_half_and_micro_by_hand():
    probs = np.array([[0.9, 0.4], [0.6, 0.7], [0.2, 0.1], [0.7, 0.8]])
    targets = np.array([[1, 1], [0, 1], [0, 0], [1, 0]])
    mask = np.ones_like(targets, dtype=bool)
    result = evaluate_predictions(probs, targets, mask, ["a", "b"], thresholds=[0.5, 0.5])
    # a: tp 2 fp 1 fn 0 -> F1 0.8 ; b: tp 1 fp 1 fn 1 -> F1 0.5
    assert result["per_attribute"]["a"]["f1_at_0.5"] == pytest.approx(0.8)
    assert result["per_attribute"]["b"]["f1_at_0.5"] == pytest.approx(0.5)
    assert result["f1_macro_at_0.5"] == pytest.approx(0.65)
    assert result["f1_micro_at_0.5"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert result["per_attribute"]["a"]["precision"] == pytest.approx(2 / 3)
