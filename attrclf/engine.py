"""Training on an Accelerator: TrainConfig, the two stages, train_one_epoch / evaluate, early stopping, outputs."""

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import demo
from .data import (
    AttrData,
    compute_pos_weight,
    eval_transform,
    label_counts,
    make_loader,
    prepare_data,
    train_transform,
)
from .errors import AttrclfError
from .losses import LOSSES, build_loss
from .metrics import evaluate_predictions, tune_thresholds
from .model import ALL_STAGES, AttrClassifier, AttrConfig
from .plots import plot_loss_curves

# Defaults of flags left unset: (with --data, for the demo). The demo trains from scratch on small images, so it
# takes bigger batches and a higher learning rate to finish in a few minutes on a CPU.
AUTO_DEFAULTS = {"image_size": (None, 48), "epochs": (30, 10), "batch_size": (32, 64), "lr": (2e-3, 3e-3)}


def _opt(help_text: str, default=None, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Optimisation and data settings of one run; saved as train_config.json, never in config.json.

    `None` on pretrained / head_epochs / unfreeze_stages / lr_finetune / image_size / epochs / batch_size / lr
    means "decide from the run" (data or demo, pretrained or from scratch):
    see `resolve`.
    """

    data: str | None = _opt("labels.txt folder, image folder with metadata.csv/.jsonl, saved dataset or Hub dataset "
                            "id; omit to train on the embedded demo")
    images: str | None = _opt("images folder (default: DATA/images, else DATA)")
    labels: str | None = _opt("labels file (default: DATA/labels.txt)")
    label_columns: list[str] | None = _opt("attribute columns to train on (default: all)")
    group_column: str | None = _opt("column whose rows must stay on one side of the split (near-duplicates)")
    val_fraction: float = _opt("fraction of images for validation when the data has no validation split", 0.2)
    demo_size: int = _opt("number of images in the generated demo dataset", 3000)
    backbone: str = _opt("timm backbone name", "resnet18")
    pretrained: bool | None = _opt("start from the backbone's pretrained weights (timm download); "
                                   "default: on with --data, off for the demo")
    backbone_weights: str | None = _opt("local pretrained weights file for the backbone (no download)")
    image_size: int | None = _opt("square input size (default: the backbone's own; 48 for the demo)")
    head_hidden: int = _opt("hidden width of the head; 0 = a single Linear", 128)
    head_dropout: float = _opt("dropout before the head's first Linear", 0.5)
    hidden_dropout: float = _opt("dropout before the head's last Linear", 0.3)
    epochs: int | None = _opt("maximum number of epochs, early stopping may end sooner (default: 30; demo: 10)")
    batch_size: int | None = _opt("images per batch and process (default: 32; demo: 64)")
    lr: float | None = _opt("learning rate of the head, and of the whole network when training from scratch "
                            "(default: 2e-3; demo: 3e-3)")
    lr_finetune: float | None = _opt("learning rate of the unfrozen backbone stages (default: 1e-4 pretrained, "
                                     "--lr from scratch)")
    weight_decay: float = _opt("AdamW weight decay (not applied to norms and biases)", 1e-2)
    head_epochs: int | None = _opt("epochs that train the head alone before unfreezing (default: 3 pretrained, "
                                   "0 from scratch)")
    unfreeze_stages: str | None = _opt("backbone stages to unfreeze after the head epochs: a number (1 = the last, "
                                       "e.g. ResNet's layer4) or 'all' (default: 1 pretrained, all from scratch)")
    early_stop_patience: int = _opt("stop after this many epochs without a better validation mAP", 5)
    loss: str = _opt("loss function", "bce", choices=sorted(LOSSES))
    pos_weight_cap: float = _opt("upper bound of the per-attribute positive weight (negatives / positives)", 50.0)
    crop_scale: float = _opt("smallest area fraction of the random resized crop", 0.5)
    hflip: float = _opt("probability of a horizontal flip (0 when left/right matters)", 0.5)
    color_jitter: float = _opt("brightness/contrast/saturation jitter (hue never changes)", 0.3)
    random_erasing: float = _opt("probability of random erasing", 0.1)
    head_feature_cache: bool = _opt("in the head-only stage, run the frozen backbone once per image (un-augmented) and "
                                    "train the head on the stored features; --no-head-feature-cache keeps "
                                    "augmentation in stage 1 at the cost of a backbone pass per image and epoch", True)
    mixed_precision: str = _opt("'auto' (bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32), 'no', 'bf16' "
                                "or 'fp16'", "auto", choices=["auto", "no", "bf16", "fp16"])
    channels_last: bool = _opt("NHWC memory format for convolutional backbones (faster oneDNN / cuDNN kernels)", True)
    num_workers: int | None = _opt("DataLoader worker processes (default: one per spare CPU core, at most 4 on CPU, "
                                   "8 with a GPU)")
    cpu_threads: int | None = _opt("torch threads per process on CPU (default: the cores divided among the processes; "
                                   "`accelerate launch` sets OMP_NUM_THREADS=1, which would leave cores idle)")
    seed: int = _opt("random seed (split, initialisation, augmentation, order)", 42)
    max_steps: int | None = _opt("stop after this many optimiser steps (smoke runs)")
    output_dir: str = _opt("where the model and reports are written", "outputs")

    def resolve(self) -> "TrainConfig":
        """A copy with every automatic default decided and the values checked."""
        cfg = copy.deepcopy(self)
        for name, (with_data, for_demo) in AUTO_DEFAULTS.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, with_data if cfg.data else for_demo)
        from_scratch = not (cfg.backbone_weights or cfg.pretrained or (cfg.pretrained is None and cfg.data))
        cfg.pretrained = bool(cfg.backbone_weights) or not from_scratch
        if cfg.head_epochs is None:
            cfg.head_epochs = 0 if from_scratch else 3
        if cfg.unfreeze_stages is None:
            cfg.unfreeze_stages = ALL_STAGES if from_scratch else "1"
        if cfg.lr_finetune is None:
            cfg.lr_finetune = cfg.lr if from_scratch else 1e-4
        if cfg.num_workers is None:
            cfg.num_workers = min(8 if torch.cuda.is_available() else 4, max(0, (os.cpu_count() or 1) - 1))
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.unfreeze_stages != ALL_STAGES and not str(self.unfreeze_stages).isdigit():
            raise AttrclfError(f"--unfreeze-stages must be a number or 'all' (got '{self.unfreeze_stages}')")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AttrclfError(f"--{name.replace('_', '-')} must be at least 1")
        if self.head_epochs < 0 or self.early_stop_patience < 1:
            raise AttrclfError("--head-epochs must be >= 0 and --early-stop-patience >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise AttrclfError("--max-steps must be at least 1")

    @property
    def unfreeze(self) -> int | str:
        return ALL_STAGES if self.unfreeze_stages == ALL_STAGES else int(self.unfreeze_stages)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """argparse from TrainConfig: one --flag-name per field, its help from the field's metadata."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a timm backbone for multilabel attributes (1 / 0 / NA). "
        "Run with `accelerate launch train.py [flags]`; with no --data it trains on the embedded demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        options = {"help": f.metadata["help"], "default": None if f.default is MISSING else f.default}
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if bool in typing.get_args(kind) or kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(kind) is list or list[str] in typing.get_args(kind):
            parser.add_argument(flag, nargs="+", metavar="NAME", **options)
        else:
            base = next((t for t in (int, float, str) if t is kind or t in typing.get_args(kind)), str)
            parser.add_argument(flag, type=base, **options)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# ---------------------------------------------------------------- building blocks


def configure_threads(cfg: TrainConfig, accelerator: Accelerator) -> int:
    """On CPU, give each process its share of the cores (accelerate's launcher pins every process to one thread)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    torch.set_num_threads(threads)
    return threads


def fast_cpu_bf16() -> bool:
    """bf16 pays on a CPU only with native bf16 instructions (AVX512-BF16 or AMX); elsewhere autocast emulates it and
    runs ~30x slower than fp32 (measured on an AVX2 EPYC)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def resolve_mixed_precision(choice: str) -> str | None:
    """--mixed-precision auto -> what `accelerate launch --mixed_precision` asked for, else bf16 where it is fast
    (a bf16-capable GPU, or a CPU with native bf16), else "no". Explicit choices pass through."""
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return None  # the launcher's setting
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    if on_cpu:
        return "bf16" if fast_cpu_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def load_training_data(cfg: TrainConfig, accelerator: Accelerator) -> AttrData:
    """The user's data, or the demo (generated once into the cache, by the main process first)."""
    data = cfg.data
    if data is None:
        with accelerator.main_process_first():
            data = str(demo.ensure_demo(cfg.demo_size))
        accelerator.print(
            f"No --data given: training on the embedded demo dataset ({cfg.demo_size} generated images, "
            f"attributes {', '.join(demo.LABEL_NAMES)}) from {data}"
        )
    return prepare_data(data, cfg.images, cfg.labels, cfg.label_columns, cfg.group_column, cfg.val_fraction, cfg.seed)


def build_model(cfg: TrainConfig, label_names: list[str]) -> AttrClassifier:
    config = AttrConfig.for_backbone(
        cfg.backbone,
        label_names,
        image_size=cfg.image_size,
        head_hidden=cfg.head_hidden,
        head_dropout=cfg.head_dropout,
        hidden_dropout=cfg.hidden_dropout,
    )
    return AttrClassifier(config, pretrained=cfg.pretrained and not cfg.backbone_weights,
                          backbone_weights=cfg.backbone_weights)


def make_optimizer(model: AttrClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the head (lr) and the backbone stages that will ever unfreeze (lr_finetune).

    Parameters frozen in the current stage have no gradient, and AdamW leaves them untouched. Norms and biases get no
    weight decay.
    """
    stages = model.backbone_stages()
    count = len(stages) if cfg.unfreeze == ALL_STAGES else min(cfg.unfreeze, len(stages))
    tail = {name for names in stages[len(stages) - count :] for name in names}
    named = {"head": list(model.head.named_parameters()),
             "backbone": [(n, p) for n, p in model.backbone.named_parameters() if n in tail]}
    lrs = {"head": cfg.lr, "backbone": cfg.lr_finetune}
    groups = []
    for part, params in named.items():
        for decay in (True, False):
            chosen = [p for _, p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lrs[part], "weight_decay": cfg.weight_decay if decay else 0.0,
                               "part": part})
    return torch.optim.AdamW(groups)


def stage_at(epoch: int, cfg: TrainConfig) -> str:
    """"head" for the first head_epochs epochs, then "finetune" (unless nothing unfreezes)."""
    if epoch < cfg.head_epochs or cfg.unfreeze == 0:
        return "head"
    return "finetune"


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Constant through the head stage, then a cosine from 1 to 0.05 over the fine-tuning epochs."""
    start = cfg.head_epochs * steps_per_epoch
    if step < start or cfg.unfreeze == 0:
        return 1.0
    span = max(1, (cfg.epochs - cfg.head_epochs) * steps_per_epoch)
    progress = min(1.0, (step - start) / span)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def set_lrs(optimizer: torch.optim.Optimizer, cfg: TrainConfig, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (cfg.lr if group["part"] == "head" else cfg.lr_finetune) * factor


def progress(iterable, accelerator: Accelerator, description: str):
    """A tqdm bar with ETA on the main process; in a log file (no terminal) it updates every 30 s, not every step."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=description, leave=False, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=0.5 if interactive else 30)


def train_one_epoch(model, loader, optimizer, loss_fn, accelerator, state: dict, cfg: TrainConfig, epoch: int):
    """One pass over the training loader; appends per-iteration losses to state["history"]. Returns the mean loss."""
    model.train()
    steps_per_epoch = len(loader)
    total, count = 0.0, 0
    bar = progress(loader, accelerator, f"epoch {epoch + 1}/{cfg.epochs} [{stage_at(epoch, cfg)}]")
    for pixel_values, targets, mask in bar:
        set_lrs(optimizer, cfg, lr_factor(state["step"], steps_per_epoch, cfg))
        logits = model(pixel_values)
        loss = loss_fn(logits, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        state["step"] += 1
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        total, count = total + value, count + 1
        iterations = state["history"]["iterations"]
        iterations["step"].append(state["step"])
        iterations["epoch"].append(epoch + 1)
        iterations["loss"].append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, loader, loss_fn, accelerator) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Loss over known labels, and (N, A) probs / targets / mask of the whole validation set, gathered once."""
    model.eval()
    all_logits, all_targets, all_masks = [], [], []
    for pixel_values, targets, mask in progress(loader, accelerator, "validate"):
        logits = model(pixel_values)
        logits, targets, mask = accelerator.gather_for_metrics((logits.float(), targets, mask))
        all_logits.append(logits.cpu())
        all_targets.append(targets.cpu())
        all_masks.append(mask.cpu())
    logits, targets, mask = torch.cat(all_logits), torch.cat(all_targets), torch.cat(all_masks)
    loss = loss_fn(logits, targets, mask.bool()).item()
    return loss, torch.sigmoid(logits).numpy(), targets.numpy(), mask.bool().numpy()


# ---------------------------------------------------------------- head stage on cached backbone features


def uses_feature_cache(cfg: TrainConfig) -> bool:
    """The head-only stage can train on stored features when it exists and the user did not opt out."""
    return cfg.head_feature_cache and (cfg.head_epochs > 0 or cfg.unfreeze == 0)


@torch.no_grad()
def backbone_features(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, F) pooled backbone features in eval mode, with (N, A) targets and mask, gathered from every process."""
    backbone = accelerator.unwrap_model(model).backbone
    was_training = backbone.training
    backbone.eval()
    features, targets, masks = [], [], []
    for pixel_values, target, mask in progress(loader, accelerator, "backbone features"):
        with accelerator.autocast():
            batch = backbone(pixel_values).float()
        batch, target, mask = accelerator.gather_for_metrics((batch, target, mask))
        features.append(batch)
        targets.append(target)
        masks.append(mask.bool())
    backbone.train(was_training)
    return torch.cat(features), torch.cat(targets), torch.cat(masks)


class CachedHeadStage:
    """The head-only stage without a backbone pass per image and epoch.

    While the backbone is frozen its BatchNorm layers stay in eval mode (AttrClassifier.train) and it has no dropout,
    so its output depends on the image alone: the backbone runs once over the training images (eval transform, no
    augmentation: the trade-off) and once over the validation images, and each head epoch trains and validates the
    head on those features. Validation is exact: the same logits the whole model gives. With several processes every
    process gathers all features and runs the same seeded head updates, so they stay identical without syncing.
    Features are computed on the first epoch, so its time includes them.
    """

    def __init__(self, data: AttrData, cfg: TrainConfig, val_loader):
        self.data, self.cfg, self.val_loader = data, cfg, val_loader
        self.train_set = self.val_set = None

    def _extract(self, model, accelerator) -> None:
        config = accelerator.unwrap_model(model).config
        loader = accelerator.prepare_data_loader(make_loader(
            self.data.train, eval_transform(config), self.cfg.batch_size, False, self.cfg.num_workers,
            channels_last=self.cfg.channels_last))
        self.train_set = backbone_features(model, loader, accelerator)
        self.val_set = backbone_features(model, self.val_loader, accelerator)

    def run_epoch(self, model, optimizer, loss_fn, accelerator, state: dict, epoch: int):
        """One head epoch on the features; returns (train loss, evaluate()'s tuple for validation)."""
        if self.train_set is None:
            self._extract(model, accelerator)
        head = accelerator.unwrap_model(model).head
        train_loss = train_head_epoch(head, self.train_set, optimizer, loss_fn, accelerator, state, self.cfg, epoch)
        return train_loss, evaluate_head(head, self.val_set, loss_fn)


def train_head_epoch(head, train_set, optimizer, loss_fn, accelerator, state: dict, cfg: TrainConfig, epoch: int):
    """One epoch of the head over (features, targets, mask), in batches of the global batch size; mean loss."""
    features, targets, mask = train_set
    batch_size = cfg.batch_size * accelerator.num_processes
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    starts = range(0, len(order) - batch_size + 1 if len(order) > batch_size else 1, batch_size)
    head.train()
    total, count = 0.0, 0
    for start in starts:
        rows = order[start : start + batch_size].to(features.device)
        set_lrs(optimizer, cfg, lr_factor(state["step"], len(starts), cfg))
        loss = loss_fn(head(features[rows]), targets[rows], mask[rows])
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        state["step"] += 1
        total, count = total + loss.item(), count + 1
        iterations = state["history"]["iterations"]
        for key, value in (("step", state["step"]), ("epoch", epoch + 1), ("loss", loss.item())):
            iterations[key].append(value)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
    return total / max(count, 1)


@torch.no_grad()
def evaluate_head(head, val_set, loss_fn) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """evaluate()'s (loss, probs, targets, mask) from stored validation features."""
    features, targets, mask = val_set
    head.eval()
    logits = head(features).float()
    loss = loss_fn(logits, targets, mask).item()
    return loss, torch.sigmoid(logits).cpu().numpy(), targets.cpu().numpy(), mask.cpu().numpy()


# ---------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """What `fit` found: the best epoch's weights and validation predictions, and the history."""

    history: dict
    best_epoch: int
    best_score: float
    best_state: dict
    val_probs: np.ndarray
    val_targets: np.ndarray
    val_mask: np.ndarray
    val_loss: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    pos_weight: list[float]


def fit(model: AttrClassifier, data: AttrData, cfg: TrainConfig, accelerator: Accelerator) -> FitResult:
    """Two-stage training with early stopping on validation mAP; keeps the best epoch's weights."""
    counts = label_counts(data.train["labels"], len(data.label_names))
    pos_weight, warnings = compute_pos_weight(counts, data.label_names, cfg.pos_weight_cap)
    for message in warnings:
        accelerator.print(f"warning: {message}")
    loss_fn = build_loss(cfg.loss, pos_weight).to(accelerator.device)
    train_loader = make_loader(data.train, train_transform(model.config, cfg.crop_scale, cfg.hflip, cfg.color_jitter,
                               cfg.random_erasing), cfg.batch_size, True, cfg.num_workers, cfg.seed,
                               channels_last=cfg.channels_last)
    val_loader = make_loader(data.validation, eval_transform(model.config), cfg.batch_size, False, cfg.num_workers,
                             channels_last=cfg.channels_last)
    model.set_trainable(0 if stage_at(0, cfg) == "head" else cfg.unfreeze)
    optimizer = make_optimizer(model, cfg)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    head_stage = CachedHeadStage(data, cfg, val_loader) if uses_feature_cache(cfg) else None

    state = {"step": 0, "history": {"iterations": {"step": [], "epoch": [], "loss": []},
                                    "epochs": {k: [] for k in ("epoch", "stage", "train_loss", "val_loss", "val_mAP",
                                                               "lr_head", "lr_backbone", "seconds")}}}
    best, since_best, start = None, 0, time.time()
    epoch = 0
    for epoch in range(cfg.epochs):
        stage = stage_at(epoch, cfg)
        if epoch > 0 and stage != stage_at(epoch - 1, cfg):
            accelerator.unwrap_model(model).set_trainable(cfg.unfreeze)
            since_best = 0  # the new stage gets its own patience
            accelerator.print(f"stage 2: unfreezing the last {cfg.unfreeze_stages} backbone stage(s) at lr {cfg.lr_finetune:g}")
        epoch_start = time.time()
        if head_stage is not None and stage == "head":
            train_loss, (val_loss, probs, targets, mask) = head_stage.run_epoch(model, optimizer, loss_fn, accelerator,
                                                                                state, epoch)
        else:
            train_loss = train_one_epoch(model, train_loader, optimizer, loss_fn, accelerator, state, cfg, epoch)
            val_loss, probs, targets, mask = evaluate(model, val_loader, loss_fn, accelerator)
        val_map = evaluate_predictions(probs, targets, mask, data.label_names, [0.5] * len(data.label_names))["mAP"]
        score = val_map if val_map is not None else -val_loss
        improved = best is None or score > best["score"] + 1e-6
        _record_epoch(state["history"], epoch, stage, train_loss, val_loss, val_map, optimizer, time.time() - epoch_start)
        accelerator.print(
            f"epoch {epoch + 1}/{cfg.epochs} [{stage}] train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"val_mAP {_fmt(val_map)}  ({time.time() - epoch_start:.0f}s){'  * best' if improved else ''}"
        )
        if improved:
            state_dict = accelerator.unwrap_model(model).state_dict()
            best = {"score": score, "epoch": epoch + 1,
                    "state": {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                              for k, v in state_dict.items()},
                    "probs": probs, "targets": targets, "mask": mask, "val_loss": val_loss}
            since_best = 0
        else:
            since_best += 1
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            accelerator.print(f"reached --max-steps {cfg.max_steps}")
            break
        if since_best >= cfg.early_stop_patience and stage == stage_at(cfg.epochs - 1, cfg):
            accelerator.print(f"early stopping: no better validation mAP for {since_best} epochs")
            break
    stopped_early = since_best >= cfg.early_stop_patience and epoch + 1 < cfg.epochs
    accelerator.unwrap_model(model).to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors
    state["history"]["best_epoch"] = best["epoch"]
    return FitResult(state["history"], best["epoch"], best["score"], best["state"], best["probs"], best["targets"],
                     best["mask"], best["val_loss"], epoch + 1, stopped_early, time.time() - start,
                     pos_weight.tolist())


def _record_epoch(history, epoch, stage, train_loss, val_loss, val_map, optimizer, seconds):
    lrs = {g["part"]: g["lr"] for g in optimizer.param_groups}
    row = {"epoch": epoch + 1, "stage": stage, "train_loss": train_loss, "val_loss": val_loss, "val_mAP": val_map,
           "lr_head": lrs.get("head"), "lr_backbone": lrs.get("backbone") if stage == "finetune" else 0.0,
           "seconds": round(seconds, 2)}
    for key, value in row.items():
        history["epochs"][key].append(value)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- results


def finalize(model: AttrClassifier, result: FitResult, data: AttrData, cfg: TrainConfig) -> dict:
    """Load the best weights, tune per-attribute thresholds on validation, and build metrics.json's content."""
    model.load_state_dict(result.best_state, strict=True)
    model.eval()
    thresholds = tune_thresholds(result.val_probs, result.val_targets, result.val_mask)
    model.config.thresholds = thresholds
    evaluation = evaluate_predictions(result.val_probs, result.val_targets, result.val_mask, data.label_names, thresholds)
    train_counts = label_counts(data.train["labels"], len(data.label_names))
    return {
        "validation": {"loss": result.val_loss, **evaluation},
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "data": {
            "source": data.source,
            "split": data.split,
            "train_images": len(data.train),
            "validation_images": len(data.validation),
            "label_names": data.label_names,
            "train_counts": dict(zip(data.label_names, _by_attribute(train_counts))),
            "validation_counts": dict(zip(data.label_names,
                                          _by_attribute(label_counts(data.validation["labels"], len(data.label_names))))),
            "skipped_images": len(data.skipped),
            "skipped": data.skipped,
        },
        "pos_weight": dict(zip(data.label_names, [round(w, 4) for w in result.pos_weight])),
        "thresholds_note": "thresholds maximise F1 on the validation split; f1_macro_tuned is measured on the same "
                           "images (optimistic), f1_macro_tuned_crossfit on held-out halves (honest)",
    }


def _by_attribute(counts: dict) -> list[dict]:
    return [{"positive": p, "negative": n, "na": na} for p, n, na in
            zip(counts["positive"], counts["negative"], counts["na"])]


def write_outputs(model: AttrClassifier, metrics: dict, result: FitResult, cfg: TrainConfig, output_dir: Path) -> list[str]:
    """Write the model package and reports: each file is written under a temporary name, then renamed into place."""
    from .hub import render_card  # the card needs jinja; keep it out of import-time

    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (staging / "history.json").write_text(json.dumps(result.history))
        plot_loss_curves(result.history, staging / "loss_curve.png",
                         title=f"attrclf: {model.config.backbone}, {len(model.config.label_names)} attributes, "
                               f"best validation mAP {_fmt(metrics['validation']['mAP'])}")
        render_card(model.config, metrics, asdict(cfg)).save(staging / "README.md")
        model.save_pretrained(staging)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:
            os.replace(staging / name, output_dir / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return written


def summary_table(metrics: dict) -> str:
    """The per-attribute validation table printed at the end of training."""
    v = metrics["validation"]
    lines = [f"{'attribute':<20} {'AP':>6} {'F1@0.5':>7} {'F1':>6} {'thresh':>7} {'pos':>5} {'neg':>5} {'NA':>5}"]
    for name, row in v["per_attribute"].items():
        lines.append(f"{name:<20} {_fmt2(row['ap']):>6} {_fmt2(row['f1_at_0.5']):>7} {_fmt2(row['f1']):>6} "
                     f"{row['threshold']:>7.3f} {row['positives']:>5} {row['negatives']:>5} {row['na']:>5}")
    lines.append(f"mAP {_fmt2(v['mAP'])}   macro-F1 at 0.5 {_fmt2(v['f1_macro_at_0.5'])}   "
                 f"tuned {_fmt2(v['f1_macro_tuned'])} (held-out halves: {_fmt2(v['f1_macro_tuned_crossfit'])})   "
                 f"micro-F1 tuned {_fmt2(v['f1_micro_tuned'])}")
    return "\n".join(lines)


def _fmt2(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"
