import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score
from sklearn.metrics import precision_recall_curve as sklearn_pr_curve

from attrclf.metrics import (
    average_precision,
    best_f1_threshold,
    crossfit_confusion,
    evaluate_predictions,
    half_f1_threshold,
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


def test_half_f1_threshold_by_hand():
    scores = np.array([0.95, 0.8, 0.6, 0.4, 0.3, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 0])
    # the best F1 is 6/7 (see above): half of it is 3/7, on the scale of a loss without positive weight
    assert half_f1_threshold(scores, labels) == pytest.approx(3 / 7)
    # positive weight 2 doubles the odds: 3/7 -> odds 3/4 -> 6/4 -> probability 0.6
    assert half_f1_threshold(scores, labels, pos_weight=2.0) == pytest.approx(0.6)
    assert half_f1_threshold(scores, np.zeros(6), pos_weight=2.0) == 0.5  # nothing to tune
    assert tune_thresholds(np.c_[scores, scores], np.c_[labels, labels], np.ones((6, 2), bool), rule="half-f1",
                           pos_weight=[1.0, 2.0]) == pytest.approx([3 / 7, 0.6])
    with pytest.raises(ValueError, match="threshold rule"):
        tune_thresholds(np.c_[scores], np.c_[labels], np.ones((6, 1), bool), rule="best")


def calibrated(n, prior_a, rng):
    """n calibrated probabilities (Beta(prior_a, 20)) and labels drawn from them."""
    probs = rng.beta(prior_a, 20, n)
    return probs, (rng.random(n) < probs).astype(np.int64)


def test_half_f1_is_the_f1_optimal_threshold_of_calibrated_probabilities_on_any_positive_weight_scale():
    # Lipton et al. 2014: on calibrated probabilities the F1-optimal threshold is half the best F1. With 200,000 rows
    # the exact search finds that optimum, and half-f1 lands on it; on the scale of a loss with positive weight w
    # (logit + log w) both move together.
    probs, labels = calibrated(200_000, 2.0, np.random.default_rng(0))
    exact = best_f1_threshold(probs, labels)
    assert half_f1_threshold(probs, labels) == pytest.approx(exact, abs=0.01)
    for weight in (5.0, 30.0):
        weighted = 1 / (1 + (1 - probs) / (probs * weight))
        assert half_f1_threshold(weighted, labels, pos_weight=weight) == pytest.approx(
            best_f1_threshold(weighted, labels), abs=0.02)


def binormal(n, rng, prior=0.03, separation=2.5):
    """n calibrated probabilities and labels: scores N(+-separation/2, 1) by class, turned into exact posteriors."""
    labels = (rng.random(n) < prior).astype(np.int64)
    scores = rng.normal(np.where(labels == 1, separation / 2, -separation / 2), 1.0)
    return 1 / (1 + np.exp(-(separation * scores + np.log(prior / (1 - prior))))), labels


def test_half_f1_thresholds_do_better_on_new_images_when_positives_are_few():
    # 300 validation rows of a rare attribute (~9 positives), 150 draws: the exact peak overfits them, half of the
    # best F1 transfers (+3 points of F1 on average here). Scored on one large fresh sample of the same distribution.
    rng = np.random.default_rng(1)
    new_probs, new_labels = binormal(400_000, rng)

    def f1_on_new(threshold):
        predicted = new_probs >= threshold
        return 2 * (predicted & (new_labels == 1)).sum() / (predicted.sum() + new_labels.sum())

    gains = []
    for _ in range(150):
        probs, labels = binormal(300, rng)
        gains.append(f1_on_new(half_f1_threshold(probs, labels)) - f1_on_new(best_f1_threshold(probs, labels)))
    assert np.mean(gains) > 0.015 and np.median(gains) > 0


def test_crossfit_tunes_with_the_rule_it_is_given():
    rng = np.random.default_rng(2)
    probs, labels = calibrated(400, 2.0, rng)
    probs, labels, mask = probs[:, None], labels[:, None], np.ones((400, 1), bool)
    halves = np.random.default_rng(0).permutation(400) % 2 == 0
    expected = [0, 0, 0]
    for fit in (halves, ~halves):
        threshold = half_f1_threshold(probs[fit, 0], labels[fit, 0], pos_weight=3.0)
        predicted = probs[~fit, 0] >= threshold
        known = labels[~fit, 0] == 1
        expected = [expected[0] + (predicted & known).sum(), expected[1] + (predicted & ~known).sum(),
                    expected[2] + (~predicted & known).sum()]
    counts = crossfit_confusion(probs, labels, mask, rule="half-f1", pos_weight=[3.0])
    assert [int(c[0]) for c in counts] == expected
    assert [int(c[0]) for c in crossfit_confusion(probs, labels, mask)] != expected  # the plain search differs
