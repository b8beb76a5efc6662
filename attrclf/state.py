"""The training loop's state as types: run state, history, the best epoch, a validation pass, what `fit` returns.

Two of them are also files, converted only at the file edge: `History` is history.json (`to_dict` / `from_dict`), and
`RunState` with `BestEpoch.summary()` is a checkpoint's training_state.json (see attrclf.checkpoints).
"""

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from .metrics import mean_average_precision


@dataclass(kw_only=True)
class EpochRecord:
    """One row of history.json's per-epoch columns."""

    epoch: int  # 1-based
    stage: str  # "head" or "finetune"
    train_loss: float
    val_loss: float
    val_mAP: float | None  # None when no attribute has both classes among its known validation labels
    lr_head: float | None
    lr_backbone: float | None  # 0.0 in the head stage
    seconds: float
    bad_images: int  # images that failed to decode in this epoch
    val_mAP_ema: float | None = None  # the same for the averaged weights (None with --ema-decay 0)


EPOCH_COLUMNS = tuple(f.name for f in fields(EpochRecord))
OPTIONAL_COLUMNS = ("val_mAP_ema",)  # written only by a run that has them (one with a weight average)


@dataclass
class Iterations:
    """Per optimiser step: the step number (1-based), its epoch (1-based) and its loss; parallel lists."""

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


@dataclass
class History:
    """history.json: every optimiser step's loss, every epoch's record, and the best epoch once training ends."""

    iterations: Iterations = field(default_factory=Iterations)
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None

    def to_dict(self) -> dict:
        """history.json's content: {"iterations": {step, epoch, loss}, "epochs": {column: [one per epoch]},
        "best_epoch": n (once known)}; the plots read this form."""
        columns = {name: [getattr(row, name) for row in self.epochs] for name in EPOCH_COLUMNS}
        for name in OPTIONAL_COLUMNS:
            if all(value is None for value in columns[name]):
                del columns[name]
        saved = {"iterations": asdict(self.iterations), "epochs": columns}
        if self.best_epoch is not None:
            saved["best_epoch"] = self.best_epoch
        return saved

    @classmethod
    def from_dict(cls, saved: dict) -> "History":
        columns = saved["epochs"]
        count = len(columns["epoch"])
        # a column added after a checkpoint was written reads as its default (None)
        rows = [EpochRecord(**dict(zip(EPOCH_COLUMNS, values, strict=True)))
                for values in zip(*(columns.get(name, [None] * count) for name in EPOCH_COLUMNS), strict=True)]
        return cls(Iterations(**saved["iterations"]), rows, saved.get("best_epoch"))


@dataclass
class RunState:
    """Where the loop stands: everything a checkpoint needs besides tensors."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    since_best: int = 0  # epochs since the best one, in this stage (early stopping)
    stop: str | None = None  # "max_steps" or "early_stopping" once the loop should end
    # once validation mAP stopped improving under --early-stop-anneal: {"step": optimiser steps done then, "epoch":
    # epochs done then, "epochs": the anneal's length}; the schedule decays from that step and the run stops after it
    anneal: dict[str, int] | None = None
    seconds: float = 0.0  # training and validation time of the epochs done
    decode_failures: dict[str, int] = field(default_factory=dict)  # image name -> epochs it failed to decode in
    history: History = field(default_factory=History)
    stream: list[dict] | None = None  # a streamed run: each process's stream state (attrclf.streaming)

    def record_step(self, epoch: int, loss: float) -> None:
        """Append the optimiser step just taken (self.step) and its loss; `epoch` is 0-based."""
        self.history.iterations.step.append(self.step)
        self.history.iterations.epoch.append(epoch + 1)
        self.history.iterations.loss.append(loss)

    def steps_into_epoch(self) -> int:
        """Steps already trained of the epoch after the `epoch` done ones: 0 except in a checkpoint written when a
        signal stopped training inside an epoch (attrclf.preemption)."""
        return self.history.iterations.epoch.count(self.epoch + 1)

    def to_dict(self) -> dict:
        """The loop's part of training_state.json (JSON-ready)."""
        # only a stream has a state, and only an annealing run an anneal: the others write the file as before them
        skip = {"history"} | {name for name in ("stream", "anneal") if getattr(self, name) is None}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip},
                "decode_failures": dict(self.decode_failures), "history": self.history.to_dict()}

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        """From training_state.json (which holds more keys: fingerprint, best, ...; they are left out)."""
        values = {f.name: saved[f.name] for f in fields(cls) if f.name != "history" and f.name in saved}
        return cls(**values, history=History.from_dict(saved["history"]))


@dataclass
class ValidationResult:
    """One pass over the validation set: the loss over known labels and (N, A) probs / targets / mask."""

    loss: float
    probs: np.ndarray  # (N, A) float32 sigmoid probabilities
    targets: np.ndarray  # (N, A) 0/1, any value where NA
    mask: np.ndarray  # (N, A) bool, True where the label is known

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    loss_fn: torch.nn.Module) -> "ValidationResult":
        """The loss where the tensors (and the loss's pos_weight) live; the arrays copied to the CPU once."""
        loss = loss_fn(logits, targets, mask).item()
        return cls(loss, torch.sigmoid(logits).cpu().numpy(), targets.cpu().numpy(), mask.cpu().numpy())

    def mean_ap(self) -> float | None:
        """Validation mAP, the one figure each epoch needs (early stopping, best epoch); the full suite of metrics
        runs once, in attrclf.reporting.finalize, on the best epoch."""
        return mean_average_precision(self.probs, self.targets, self.mask)


@dataclass(kw_only=True)
class BestEpoch:
    """The best epoch so far: its score (mAP, or -loss without one), weights (CPU, contiguous) and validation output."""

    score: float
    epoch: int  # 1-based
    val_loss: float
    state: dict[str, torch.Tensor]
    probs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    weights: str = "raw"  # which weights scored best: "raw", or "ema" (the moving average, attrclf.ema)

    def summary(self) -> dict:
        """What training_state.json records of it; the tensors go to safetensors files beside it."""
        return {"score": self.score, "epoch": self.epoch, "val_loss": self.val_loss, "weights": self.weights}


@dataclass
class FitResult:
    """What `fit` found: the best epoch and the history, and how the run went."""

    history: History
    best: BestEpoch
    epochs_run: int
    stopped_early: bool
    seconds: float
    pos_weight: list[float]
    decode_failures: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    mixed_precision: str = "no"
    resumed_from: str | None = None
