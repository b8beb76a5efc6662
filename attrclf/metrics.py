"""Metrics over known labels only, and per-attribute threshold tuning.

Written by hand (numpy) because no library masks NA per attribute: each attribute is scored on the rows where its
label is known. AP follows scikit-learn's definition (step-wise precision-recall area, no interpolation).
"""

import numpy as np


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct score, highest score first (1-D inputs, some positive).

    The points are scikit-learn's `precision_recall_curve` without its closing (precision 1, recall 0) point,
    highest threshold first.
    """
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each_score]
    fps = last_of_each_score + 1 - tps
    return tps / (tps + fps), tps / tps[-1], scores[last_of_each_score]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of `scores` against binary `labels` (1-D); NaN if there is no positive."""
    if labels.sum() == 0:
        return float("nan")
    precision, recall, _ = precision_recall_curve(scores, labels)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_at_each_cut(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 when predicting 1 for every score >= each distinct score, highest first, and those scores (some positive)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each_score]
    fps = last_of_each_score + 1 - tps
    return 2 * tps / (2 * tps + fps + (labels.sum() - tps)), scores[last_of_each_score]


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, default: float = 0.5) -> float:
    """The threshold (predict 1 when score >= it) that maximises F1 on these known labels.

    The threshold sits halfway between the chosen score and the next lower one, so it does not hinge on one example.
    Without positives F1 cannot be tuned and `default` is returned.
    """
    if labels.sum() == 0 or len(scores) == 0:
        return default
    f1, cut_scores = _f1_at_each_cut(scores, labels)
    best = int(np.argmax(f1))
    lower = cut_scores[best + 1] if best + 1 < len(cut_scores) else 0.0
    return float((cut_scores[best] + lower) / 2)


def half_f1_threshold(scores: np.ndarray, labels: np.ndarray, pos_weight: float = 1.0,
                      default: float = 0.5) -> float:
    """Half the best F1 as a probability threshold (Lipton, Elkan & Narayanaswamy, ECML 2014), on `scores`' scale.

    For calibrated probabilities the F1-maximising threshold is exactly half the best F1 reachable. The best F1 is a
    stable figure even with a handful of positives, where the score at which it is reached is not: the plain search
    (`best_f1_threshold`) then lands on 0.99 or 0.01 and misses on new images. A BCE trained with a positive weight
    w gives scores sigmoid(logit(p) + log w), so the threshold is moved onto that scale. Without positives `default`.
    """
    if labels.sum() == 0 or len(scores) == 0:
        return default
    half_best = float(_f1_at_each_cut(scores, labels)[0].max()) / 2  # in (0, 0.5]: F1 > 0 when positives exist
    return float(1 / (1 + (1 - half_best) / (half_best * pos_weight)))


THRESHOLD_RULES = ("half-f1", "max-f1")


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, *, rule: str = "max-f1",
                    pos_weight=None, default: float = 0.5) -> list[float]:
    """Per-attribute thresholds over known labels; (N, A) inputs.

    Args:
        rule: "max-f1" (the threshold that maximises F1 on these rows) or "half-f1" (`half_f1_threshold`).
        pos_weight: (A,) the loss's positive weights, which "half-f1" takes out; None = 1.
    """
    weights = np.ones(probs.shape[1]) if pos_weight is None else np.asarray(pos_weight, np.float64)
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule == "half-f1":
        return [half_f1_threshold(probs[mask[:, a], a], targets[mask[:, a], a], float(weights[a]), default)
                for a in range(probs.shape[1])]
    return [best_f1_threshold(probs[mask[:, a], a], targets[mask[:, a], a], default) for a in range(probs.shape[1])]


def confusion(probs, targets, mask, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A,) true positives, false positives, false negatives over known labels."""
    predicted = probs >= np.asarray(thresholds)[None, :]
    known_pos = mask & (targets == 1)
    known_neg = mask & (targets == 0)
    tp = (predicted & known_pos).sum(0)
    fp = (predicted & known_neg).sum(0)
    fn = (~predicted & known_pos).sum(0)
    return tp, fp, fn


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def f1_summary(tp, fp, fn, evaluated: np.ndarray) -> dict:
    """Per-attribute precision / recall / F1 and micro / macro F1 over the `evaluated` attributes."""
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    t, p, n = tp[evaluated].sum(), fp[evaluated].sum(), fn[evaluated].sum()
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "f1_micro": float(_ratio(2 * t, 2 * t + p + n)),
        "f1_macro": float(f1[evaluated].mean()) if evaluated.any() else float("nan"),
    }


def crossfit_confusion(probs, targets, mask, seed: int = 0, *, rule: str = "max-f1", pos_weight=None):
    """Confusion counts of tuned thresholds measured on data they were NOT tuned on.

    Validation rows are split in two halves; thresholds tuned on one half (by `rule`, see `tune_thresholds`) are
    scored on the other, and the counts of both directions are added. This is the honest estimate of tuned-threshold
    F1; tuning and scoring on the same rows flatters it.
    """
    halves = np.random.default_rng(seed).permutation(len(probs)) % 2 == 0
    total = [np.zeros(probs.shape[1], dtype=np.int64) for _ in range(3)]
    for fit_rows in (halves, ~halves):
        thresholds = tune_thresholds(probs[fit_rows], targets[fit_rows], mask[fit_rows], rule=rule,
                                     pos_weight=pos_weight)
        counts = confusion(probs[~fit_rows], targets[~fit_rows], mask[~fit_rows], thresholds)
        total = [a + b for a, b in zip(total, counts, strict=True)]
    return tuple(total)


def per_attribute_ap(probs, targets, mask) -> tuple[np.ndarray, np.ndarray]:
    """(A,) AP of each attribute over its known labels, and (A,) bool: the attribute has both classes known.

    Inputs as `evaluate_predictions` takes them. AP is NaN for an attribute without a known positive.
    """
    probs, targets, mask = np.asarray(probs, np.float64), np.asarray(targets), np.asarray(mask, bool)
    targets = np.where(mask, targets, 0).astype(np.int64)
    evaluated = (mask & (targets == 1)).any(0) & (mask & (targets == 0)).any(0)
    ap = np.array([average_precision(probs[mask[:, a], a], targets[mask[:, a], a]) for a in range(probs.shape[1])])
    return ap, evaluated


def mean_average_precision(probs, targets, mask) -> float | None:
    """mAP over the attributes with both classes among their known labels; None when there is none.

    The same figure as `evaluate_predictions(...)["mAP"]`, without the F1 and threshold searches: what each training
    epoch needs for early stopping.
    """
    ap, evaluated = per_attribute_ap(probs, targets, mask)
    return _clean(ap[evaluated].mean()) if evaluated.any() else None


def evaluate_predictions(probs, targets, mask, label_names: list[str], thresholds: list[float] | None = None, *,
                         rule: str = "max-f1", pos_weight=None) -> dict:
    """Every validation metric, NA skipped.

    Args:
        probs: (N, A) probabilities.
        targets: (N, A) 0/1 (any value where NA).
        mask: (N, A) bool, True where the label is known.
        label_names: A names.
        thresholds: Tuned per-attribute thresholds; tuned here (by `rule`) when None.
        rule, pos_weight: how thresholds are tuned, here and in the cross-fitted F1 (see `tune_thresholds`).

    Returns:
        A JSON-ready dict: mAP (over attributes with both classes among known labels), micro / macro F1 at 0.5,
        at the tuned thresholds and cross-fitted, and a per-attribute table.
    """
    probs, targets, mask = np.asarray(probs, np.float64), np.asarray(targets), np.asarray(mask, bool)
    targets = np.where(mask, targets, 0).astype(np.int64)
    positives = (mask & (targets == 1)).sum(0)
    negatives = (mask & (targets == 0)).sum(0)
    ap, evaluated = per_attribute_ap(probs, targets, mask)
    if thresholds is None:
        thresholds = tune_thresholds(probs, targets, mask, rule=rule, pos_weight=pos_weight)
    at_half = f1_summary(*confusion(probs, targets, mask, [0.5] * probs.shape[1]), evaluated)
    tuned = f1_summary(*confusion(probs, targets, mask, thresholds), evaluated)
    crossfit = f1_summary(*crossfit_confusion(probs, targets, mask, rule=rule, pos_weight=pos_weight), evaluated)
    per_attribute = {
        name: {
            "ap": _clean(ap[a]),
            "threshold": float(thresholds[a]),
            "precision": tuned["precision"][a],
            "recall": tuned["recall"][a],
            "f1": tuned["f1"][a],
            "f1_at_0.5": at_half["f1"][a],
            "positives": int(positives[a]),
            "negatives": int(negatives[a]),
            "na": int((~mask[:, a]).sum()),
            "evaluated": bool(evaluated[a]),
        }
        for a, name in enumerate(label_names)
    }
    return {
        "mAP": _clean(ap[evaluated].mean()) if evaluated.any() else None,
        "f1_micro_at_0.5": at_half["f1_micro"],
        "f1_macro_at_0.5": _clean(at_half["f1_macro"]),
        "f1_micro_tuned": tuned["f1_micro"],
        "f1_macro_tuned": _clean(tuned["f1_macro"]),
        "f1_macro_tuned_crossfit": _clean(crossfit["f1_macro"]),
        "evaluated_attributes": [n for n, e in zip(label_names, evaluated, strict=True) if e],
        "num_images": int(len(probs)),
        "per_attribute": per_attribute,
    }


def _clean(value) -> float | None:
    """JSON has no NaN: undefined metrics become null."""
    value = float(value)
    return None if np.isnan(value) else value
