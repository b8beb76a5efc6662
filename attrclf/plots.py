"""Training plots as PNG files (matplotlib, no display needed)."""

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt

from .metrics import average_precision, confusion, precision_recall_curve


def plot_loss_curves(history: dict, path: Path, title: str = "attrclf training") -> Path:
    """Two panels: per-iteration training loss, and per-epoch train vs validation loss (stage changes marked)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    iterations = history["iterations"]
    left.plot(iterations["step"], iterations["loss"], linewidth=0.8, alpha=0.5, label="per iteration")
    if len(iterations["loss"]) >= 20:
        window = max(5, len(iterations["loss"]) // 50)
        smooth = _moving_average(iterations["loss"], window)
        left.plot(iterations["step"][window - 1 :], smooth, linewidth=1.8, label=f"moving average ({window})")
    left.set_xlabel("iteration_number")
    left.set_ylabel("training_loss")
    left.set_title("Training loss per iteration")
    left.legend()
    left.grid(alpha=0.3)

    epochs = history["epochs"]
    right.plot(epochs["epoch"], epochs["train_loss"], marker="o", label="train")
    right.plot(epochs["epoch"], epochs["val_loss"], marker="o", label="validation")
    stages = epochs["stage"]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            right.axvline(epochs["epoch"][i] - 0.5, color="grey", linestyle="--", linewidth=1)
            right.text(epochs["epoch"][i] - 0.45, right.get_ylim()[1], f" {stages[i]}", va="top", fontsize=8)
    if history.get("best_epoch"):
        right.axvline(history["best_epoch"], color="green", linestyle=":", linewidth=1.2, label="best (val mAP)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("epoch")
    right.set_ylabel("loss (known labels only)")
    right.set_title("Train vs validation loss per epoch")
    right.legend()
    right.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr_curves(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, label_names: list[str],
                   thresholds: list[float], path: Path, title: str = "Precision-recall per attribute") -> Path:
    """One precision-recall panel per attribute over its known validation labels, the tuned threshold marked.

    Args:
        probs: (N, A) validation probabilities.
        targets: (N, A) 0/1 labels (anything where NA).
        mask: (N, A) bool, True where the label is known.
        label_names: A names.
        thresholds: A tuned thresholds.
        path: PNG to write.
    """
    columns = min(4, len(label_names))
    rows = math.ceil(len(label_names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.0 * rows + 0.6), squeeze=False)
    tp, fp, fn = confusion(probs, targets, mask, thresholds)
    # the grid may have more panels than attributes (the spare ones are hidden below): strict=False on purpose
    for a, (ax, name) in enumerate(zip(axes.flat, label_names, strict=False)):
        scores, labels = probs[mask[:, a], a], targets[mask[:, a], a].astype(np.int64)
        positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
        ax.set_title(f"{name}\n{positives} positive / {negatives} negative", fontsize=9)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.04), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
        if positives == 0 or negatives == 0:
            ax.text(0.5, 0.5, "one class only:\nnot evaluated", ha="center", va="center", fontsize=9)
            continue
        precision, recall, _ = precision_recall_curve(scores, labels)
        ap = average_precision(scores, labels)
        ax.plot(np.r_[0.0, recall], np.r_[precision[0], precision], drawstyle="steps-pre", label=f"AP {ap:.3f}")
        ax.axhline(positives / len(labels), color="grey", linestyle="--", linewidth=1, label="chance")
        point = (tp[a] / max(tp[a] + fn[a], 1), tp[a] / max(tp[a] + fp[a], 1))
        ax.plot(*point, "o", color="red", label=f"threshold {thresholds[a]:.2f}")
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(label_names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
