"""The optimizer and its schedule: AdamW over the head and the backbone stages that unfreeze, stage by epoch, lr."""

import math

import torch

from .config import TrainConfig
from .model import ALL_STAGES, AttrClassifier


def make_optimizer(model: AttrClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the head (lr) and the backbone stages that will ever unfreeze (lr_finetune).

    With --lr-layer-decay d < 1 the backbone's stage k below the last (k = 0 for the last) trains at
    lr_finetune * d**k (layer-wise learning-rate decay, as in ULMFiT's discriminative fine-tuning and BEiT's layer
    decay): the generic early stages move least. Each group holds its `scale` (d**k; 1 for the head), which `set_lrs`
    multiplies in. Parameters frozen in the current stage have no gradient, and AdamW leaves them untouched. Norms
    and biases get no weight decay.
    """
    stages = model.backbone_stages()
    count = len(stages) if cfg.unfreeze == ALL_STAGES else min(cfg.unfreeze, len(stages))
    by_name = dict(model.backbone.named_parameters())
    parts: dict[tuple[str, float], list[torch.nn.Parameter]] = {("head", 1.0): list(model.head.parameters())}
    for index, names in enumerate(stages[len(stages) - count:]):  # in the backbone's order, the last stage at depth 0
        depth = count - 1 - index
        # stages of one scale share a group: without layer decay, one backbone group in the backbone's parameter
        # order, as before the option existed (a checkpoint's optimizer state is matched by position)
        parts.setdefault(("backbone", cfg.lr_layer_decay ** depth), []).extend(by_name[n] for n in names)
    base = {"head": cfg.lr, "backbone": cfg.lr_finetune}
    groups = []
    for (part, scale), params in parts.items():
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": base[part] * scale, "part": part, "scale": scale,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups)


def stage_at(epoch: int, cfg: TrainConfig) -> str:
    """"head" for the first head_epochs epochs, then "finetune" (unless nothing unfreezes)."""
    if epoch < cfg.head_epochs or cfg.unfreeze == 0:
        return "head"
    return "finetune"


LR_FLOOR = 0.05  # the schedule's last factor: the cosine ends at 5% of each base lr


def cosine_from(start: float, end: float, progress: float) -> float:
    """A half cosine from `start` (progress 0) to `end` (progress 1 and beyond)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig, part: str = "backbone",
              anneal: dict | None = None) -> float:
    """Constant through the head stage; then, from the switch to fine-tuning, a cosine from 1 to 0.05 over the
    fine-tuning epochs, multiplied for its first --switch-warmup epochs by a linear ramp from 1/warm-up steps to 1.

    `part` "head" skips the ramp with --no-switch-warmup-head (the head, trained already, keeps its schedule while the
    unfrozen backbone stages warm up). `step` counts the optimiser steps done before this one; a run from scratch
    (no head stage) warms up too. `anneal` (RunState.anneal: {"step", "epoch", "epochs"}, set when validation mAP
    stopped improving and --early-stop-anneal is on) bends the schedule from that step: a half cosine from the factor
    it had there down to the floor over `epochs` epochs, the end the full schedule would have reached.
    """
    if anneal is not None and step >= anneal["step"]:
        begin = lr_factor(anneal["step"], steps_per_epoch, cfg, part)
        span = max(1, anneal["epochs"] * steps_per_epoch)
        return cosine_from(begin, min(begin, LR_FLOOR), (step - anneal["step"]) / span)
    start = cfg.head_epochs * steps_per_epoch
    if step < start or cfg.unfreeze == 0:
        return 1.0
    span = max(1, (cfg.epochs - cfg.head_epochs) * steps_per_epoch)
    cosine = cosine_from(1.0, LR_FLOOR, (step - start) / span)
    warmup_steps = cfg.switch_warmup * steps_per_epoch
    if part == "head" and not cfg.switch_warmup_head:
        return cosine
    if step - start < warmup_steps:
        return cosine * (step - start + 1) / warmup_steps
    return cosine


def set_lrs(optimizer: torch.optim.Optimizer, cfg: TrainConfig, factor: float,
            head_factor: float | None = None) -> None:
    """Each parameter group's base lr (head: --lr, backbone: --lr-finetune) times its layer-decay `scale` and the
    schedule's factor (the head's own `head_factor` when given)."""
    for group in optimizer.param_groups:
        scale = group.get("scale", 1.0)
        if group["part"] == "head":
            group["lr"] = cfg.lr * scale * (factor if head_factor is None else head_factor)
        else:
            group["lr"] = cfg.lr_finetune * scale * factor


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{"head": lr, "backbone": lr} as the optimizer holds them now, the highest of a part's groups (the backbone's
    last stage under --lr-layer-decay); a part without parameters is absent."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        lrs[group["part"]] = max(group["lr"], lrs.get(group["part"], 0.0))
    return lrs
