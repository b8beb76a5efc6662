"""An exponential moving average of the weights (timm's ModelEmaV3), validated beside the raw weights.

The average follows every optimiser step, with timm's decay warm-up (0 at the first optimiser step, then 1 -
step^-3/4, capped at --ema-decay) so that it tracks a short run closely and smooths a long one. Each epoch both weight
sets are validated and the better one competes for the best epoch (attrclf.engine); the kept set is named in
metrics.json and the card ("weights": "raw" or "ema"). A checkpoint stores the average as safetensors
(attrclf.checkpoints), so a resumed run continues the same average.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

from .config import TrainConfig

WARMUP_POWER = 0.75  # timm's suggestion for runs of fewer than ~10k steps


def make_ema(model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str) -> ModelEmaV3 | None:
    """An average of `model` (the unwrapped one) on `device`, the training device, or None with --ema-decay 0.

    The model is built on the CPU and `accelerator.prepare` would move it later, leaving a copy made now behind on the
    CPU, where the first update on a GPU fails. So the model moves to `device` first (in place: an optimizer built on
    its parameters keeps them), and the average is copied from it there: both on one device, timm updates all the
    tensors in one fused (foreach) call."""
    if not cfg.ema_decay:
        return None
    model.to(device)
    # float32 whatever autocast does: bf16 weights cannot hold a small EMA step
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=WARMUP_POWER, dtype=torch.float32)


def update_ema(ema: ModelEmaV3 | None, model: torch.nn.Module, step: int) -> None:
    """Fold the weights after optimiser step `step` (1-based) into the average."""
    if ema is not None:
        ema.update(model, step=step)
