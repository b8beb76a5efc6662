"""Training plots as PNG files (matplotlib, no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402


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


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
