"""Training on an Accelerator: TrainConfig, the two stages, train_one_epoch / evaluate, early stopping, outputs."""

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from . import demo
from .data import (
    NA_POLICIES,
    AttrData,
    BatchMixer,
    DecodeFailures,
    apply_na_policy,
    balanced_sample_weights,
    compute_pos_weight,
    data_fingerprint,
    eval_transform,
    label_counts,
    make_folds,
    make_loader,
    prepare_data,
    train_transform,
    training_counts,
)
from .errors import AttrclfError
from .hub import render_card
from .losses import LOSSES, build_loss
from .metrics import evaluate_predictions, tune_thresholds
from .model import ALL_STAGES, AttrClassifier, AttrConfig
from .plots import plot_loss_curves, plot_pr_curves

# Defaults of flags left unset: (with --data, for the demo). The demo trains from scratch on small images, so it
# takes bigger batches and a higher learning rate to finish in a few minutes on a CPU.
AUTO_DEFAULTS = {"image_size": (None, 48), "epochs": (30, 10), "batch_size": (32, 64), "lr": (2e-3, 3e-3)}

LATEST = "latest"  # --resume without a path
CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/epoch_NNNN
STATE_FILE = "training_state.json"
BEST_WEIGHTS = "best_model.safetensors"
BEST_PREDICTIONS = "best_validation.safetensors"
CV_FIGURES = ("mAP", "f1_macro_at_0.5", "f1_macro_tuned_crossfit")
# settings that may change on --resume without a warning: they do not change what the run computes
RESUME_FREE = {"resume", "output_dir", "keep_checkpoints", "num_workers", "cpu_threads", "epochs", "max_steps"}


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
    loss: str = _opt("loss over known labels: bce, asl (asymmetric loss) or focal", "bce", choices=sorted(LOSSES))
    asl_gamma_neg: float = _opt("--loss asl: focusing exponent of negatives", 4.0)
    asl_gamma_pos: float = _opt("--loss asl: focusing exponent of positives", 0.0)
    asl_clip: float = _opt("--loss asl: probability margin; negatives with p below it give no loss", 0.05)
    focal_gamma: float = _opt("--loss focal: focusing exponent", 2.0)
    focal_alpha: float | None = _opt("--loss focal: weight of positives in [0, 1], negatives get 1 - alpha; "
                                     "None weighs both 1")
    na_policy: str = _opt("what the training loss does with NA labels: 'ignore' leaves them out, 'negative' counts "
                          "them as absent (the common baseline, for comparison; pos_weight then counts them as "
                          "negatives too). Validation metrics and threshold tuning always skip NA", "ignore",
                          choices=list(NA_POLICIES))
    pos_weight_cap: float = _opt("upper bound of the per-attribute positive weight (negatives / positives)", 50.0)
    crop_scale: float = _opt("smallest area fraction of the random resized crop", 0.5)
    hflip: float = _opt("probability of a horizontal flip (0 when left/right matters)", 0.5)
    color_jitter: float = _opt("brightness/contrast/saturation jitter (hue never changes)", 0.3)
    random_erasing: float = _opt("probability of random erasing", 0.1)
    mixup: float = _opt("mixup: Beta(alpha, alpha) of the blend weight, 0 = off; a mixed label is known only where "
                        "both images' labels are known", 0.0)
    cutmix: float = _opt("CutMix: Beta(alpha, alpha) of the kept area, 0 = off; with --mixup too, each batch uses "
                         "one of the two (probability 0.5)", 0.0)
    balanced_sampler: bool = _opt("draw training images with replacement, each weighted by its rarest KNOWN positive "
                                  "attribute: weight = known / positives of that attribute (1 with no known positive), "
                                  "capped at --pos-weight-cap", False)
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
    keep_checkpoints: int = _opt("full training-state checkpoints kept in OUTPUT/checkpoints, one written after each "
                                 "epoch (the last K stay; 0 = none); removed once the run has written its outputs", 2)
    resume: str | None = _opt("continue an interrupted run from the latest checkpoint in OUTPUT/checkpoints, or from "
                              "the checkpoint folder PATH", nargs="?", const=LATEST, metavar="PATH")
    folds: int | None = _opt("k-fold cross-validation: K models, fold k validating the one trained on the other "
                             "folds (grouped by --group-column); writes OUTPUT/fold_1..fold_K and OUTPUT/cv_summary.json")
    push_to_hub: str | None = _opt("Hub model repo (namespace/name) to push the trained model folder to, from the "
                                   "main process, once training ends")
    hub_private: bool = _opt("create the --push-to-hub repo private", False)
    license: str = _opt("license in the model card (check your data's and the backbone weights' terms)",
                        "apache-2.0")
    dataset_id: str | None = _opt("Hub dataset id named in the model card; when unset, --data if it is one")

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
        if cfg.dataset_id is None and cfg.data and cfg.data.count("/") == 1 and not Path(cfg.data).exists():
            cfg.dataset_id = cfg.data  # a Hub dataset id: the card links it
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
        if self.mixup < 0 or self.cutmix < 0:
            raise AttrclfError(f"--mixup and --cutmix must be >= 0, 0 = off (got {self.mixup:g}, {self.cutmix:g})")
        if self.na_policy not in NA_POLICIES:
            raise AttrclfError(f"--na-policy must be one of {', '.join(NA_POLICIES)} (got '{self.na_policy}')")
        if self.keep_checkpoints < 0:
            raise AttrclfError("--keep-checkpoints must be 0 (no checkpoints) or more")
        if self.folds is not None and self.folds < 2:
            raise AttrclfError(f"--folds must be at least 2 (got {self.folds})")
        if self.folds and self.push_to_hub:
            raise AttrclfError("--push-to-hub cannot be combined with --folds (K models): push the fold you want with "
                               "`python -m attrclf.hub push OUTPUT/fold_k ID`")
        if self.folds and self.resume not in (None, LATEST):
            raise AttrclfError("--resume PATH cannot be combined with --folds: use --resume alone, it finds each "
                               "fold's latest checkpoint")
        build_loss(self.loss, **self.loss_options())  # the loss checks its own settings

    def loss_options(self) -> dict:
        """The --asl-* / --focal-* settings of the chosen loss, as keyword arguments of its class."""
        if self.loss == "asl":
            return {"gamma_neg": self.asl_gamma_neg, "gamma_pos": self.asl_gamma_pos, "clip": self.asl_clip}
        if self.loss == "focal":
            return {"gamma": self.focal_gamma, "alpha": self.focal_alpha}
        return {}

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
        options.update({k: f.metadata[k] for k in ("choices", "nargs", "const", "metavar") if k in f.metadata})
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


def training_batch(cfg: TrainConfig):
    """(pixels, targets, mask) -> the same after --na-policy, then --mixup / --cutmix: training batches only."""
    mixer = BatchMixer(cfg.mixup, cfg.cutmix) if cfg.mixup or cfg.cutmix else None

    def prepare(pixel_values, targets, mask):
        targets, mask = apply_na_policy(targets, mask, cfg.na_policy)
        return mixer(pixel_values, targets, mask) if mixer else (pixel_values, targets, mask)

    return prepare


def record_step(state: dict, epoch: int, loss: float) -> None:
    """Append the optimiser step just taken (state["step"]) and its loss to the per-iteration history."""
    iterations = state["history"]["iterations"]
    iterations["step"].append(state["step"])
    iterations["epoch"].append(epoch + 1)
    iterations["loss"].append(loss)


def train_one_epoch(model, loader, optimizer, loss_fn, accelerator, state: dict, cfg: TrainConfig, epoch: int):
    """One pass over the training loader; appends per-iteration losses to state["history"]. Returns the mean loss."""
    model.train()
    prepare = training_batch(cfg)
    steps_per_epoch = len(loader)
    total, count = 0.0, 0
    bar = progress(loader, accelerator, f"epoch {epoch + 1}/{cfg.epochs} [{stage_at(epoch, cfg)}]")
    for pixel_values, targets, mask in bar:
        pixel_values, targets, mask = prepare(pixel_values, targets, mask)
        set_lrs(optimizer, cfg, lr_factor(state["step"], steps_per_epoch, cfg))
        logits = model(pixel_values)
        loss = loss_fn(logits, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        state["step"] += 1
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        total, count = total + value, count + 1
        record_step(state, epoch, value)
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
        all_logits.append(logits)
        all_targets.append(targets)
        all_masks.append(mask.bool())
    return validation_result(torch.cat(all_logits), torch.cat(all_targets), torch.cat(all_masks), loss_fn)


def validation_result(logits, targets, mask, loss_fn) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(loss, probs, targets, mask) of the whole validation set; the loss is computed where the tensors (and the
    loss's pos_weight) live, the arrays are copied to the CPU once."""
    loss = loss_fn(logits, targets, mask).item()
    return loss, torch.sigmoid(logits).cpu().numpy(), targets.cpu().numpy(), mask.cpu().numpy()


# ---------------------------------------------------------------- head stage on cached backbone features


def uses_feature_cache(cfg: TrainConfig) -> bool:
    """The head-only stage can train on stored features when it exists and the user did not opt out."""
    batch_level = cfg.mixup or cfg.cutmix or cfg.balanced_sampler  # they act on images / the sampler, not features
    return cfg.head_feature_cache and not batch_level and (cfg.head_epochs > 0 or cfg.unfreeze == 0)


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

    def __init__(self, data: AttrData, cfg: TrainConfig):
        self.data, self.cfg = data, cfg
        self.train_set = self.val_set = None

    def _extract(self, model, val_loader, accelerator) -> None:
        config = accelerator.unwrap_model(model).config
        loader = accelerator.prepare_data_loader(make_loader(
            self.data.train, eval_transform(config), self.cfg.batch_size, False, self.cfg.num_workers,
            channels_last=self.cfg.channels_last))
        self.train_set = backbone_features(model, loader, accelerator)
        self.val_set = backbone_features(model, val_loader, accelerator)

    def run_epoch(self, model, optimizer, val_loader, loss_fn, accelerator, state: dict, epoch: int):
        """One head epoch on the features; returns (train loss, evaluate()'s tuple for validation)."""
        if self.train_set is None:
            self._extract(model, val_loader, accelerator)
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
        batch_targets, batch_mask = apply_na_policy(targets[rows], mask[rows], cfg.na_policy)
        loss = loss_fn(head(features[rows]), batch_targets, batch_mask)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        state["step"] += 1
        value = loss.item()
        total, count = total + value, count + 1
        record_step(state, epoch, value)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
    return total / max(count, 1)


@torch.no_grad()
def evaluate_head(head, val_set, loss_fn) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """evaluate()'s (loss, probs, targets, mask) from stored validation features."""
    features, targets, mask = val_set
    head.eval()
    return validation_result(head(features).float(), targets, mask, loss_fn)


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
    decode_failures: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    mixed_precision: str = "no"
    resumed_from: str | None = None


@dataclass
class TrainingParts:
    """One run's pieces before `accelerator.prepare` wraps them; `failures` count images that break mid-training."""

    model: AttrClassifier
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    failures: tuple[DecodeFailures, DecodeFailures]
    pos_weight: torch.Tensor
    head_stage: "CachedHeadStage | None" = None


@dataclass
class Prepared:
    """The parts as `accelerator.prepare` wrapped them for one stage."""

    stage: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


def setup_training(model: AttrClassifier, data: AttrData, cfg: TrainConfig, accelerator: Accelerator) -> TrainingParts:
    """Loss with the training split's pos_weight (the same on every process: the split is seeded), loaders, optimizer."""
    counts = training_counts(data.train["labels"], len(data.label_names), cfg.na_policy)
    pos_weight, warnings = compute_pos_weight(counts, data.label_names, cfg.pos_weight_cap)
    for message in warnings:
        accelerator.print(f"warning: {message}")
    loss_fn = build_loss(cfg.loss, pos_weight, **cfg.loss_options()).to(accelerator.device)
    sample_weights = (balanced_sample_weights(data.train["labels"], len(data.label_names), cfg.pos_weight_cap)
                      if cfg.balanced_sampler else None)
    failures = (DecodeFailures(data.train["image_name"]), DecodeFailures(data.validation["image_name"]))
    train_loader = make_loader(data.train, train_transform(model.config, cfg.crop_scale, cfg.hflip, cfg.color_jitter,
                               cfg.random_erasing), cfg.batch_size, True, cfg.num_workers, cfg.seed,
                               sample_weights, failures[0], channels_last=cfg.channels_last)
    val_loader = make_loader(data.validation, eval_transform(model.config), cfg.batch_size, False, cfg.num_workers,
                             failures=failures[1], channels_last=cfg.channels_last)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer's parameters stay the same objects
    head_stage = CachedHeadStage(data, cfg) if uses_feature_cache(cfg) else None
    return TrainingParts(model, loss_fn, make_optimizer(model, cfg), train_loader, val_loader, failures, pos_weight,
                         head_stage)


def prepare_stage(accelerator: Accelerator, parts: TrainingParts, cfg: TrainConfig, stage: str,
                  prepared: Prepared | None = None) -> Prepared:
    """Make the stage's parameters trainable, then wrap the parts with `accelerator.prepare` (again).

    DistributedDataParallel registers only the parameters that require grad when it wraps the model: a parameter
    unfrozen later would train on each process's own gradients, unsynchronised, and the processes would drift apart.
    So a stage switch releases the old wrappers and prepares afresh. One process has no wrapper to renew.
    The accelerator is emptied first: its `save_state` must hold this run's parts and nothing else.
    """
    parts.model.set_trainable(0 if stage == "head" else cfg.unfreeze)
    if prepared is not None and prepared.model is parts.model:
        return replace(prepared, stage=stage)
    if prepared is not None:
        accelerator.unwrap_model(prepared.model, keep_fp32_wrapper=False)  # prepare adds the autocast wrapper again
    accelerator.free_memory()
    return Prepared(stage, *accelerator.prepare(parts.model, parts.optimizer, parts.train_loader, parts.val_loader))


def seed_epoch(cfg: TrainConfig, epoch: int, accelerator: Accelerator, parts: TrainingParts) -> None:
    """Seeds from (--seed, epoch): a resumed epoch shuffles, augments and drops out exactly like an uninterrupted one.

    The loader's generator (sample order, worker seeds) gets the same seed on every process; the global generators
    (augmentation without workers, dropout) get it plus the process index.
    """
    seed = int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]) % 2**31
    parts.train_loader.generator.manual_seed(seed)
    set_seed(seed, device_specific=True)


def new_run_state() -> dict:
    """The loop's state, everything a checkpoint needs besides tensors; JSON-serialisable."""
    epoch_columns = ("epoch", "stage", "train_loss", "val_loss", "val_mAP", "lr_head", "lr_backbone", "seconds",
                     "bad_images")
    return {"epoch": 0, "step": 0, "since_best": 0, "stop": None, "seconds": 0.0, "decode_failures": {},
            "history": {"iterations": {"step": [], "epoch": [], "loss": []}, "epochs": {k: [] for k in epoch_columns}}}


def fit(model: AttrClassifier, data: AttrData, cfg: TrainConfig, accelerator: Accelerator,
        resume_from: Path | None = None) -> FitResult:
    """Two-stage training with early stopping on validation mAP; keeps the best epoch's weights.

    After every epoch the whole training state goes to OUTPUT/checkpoints (see `save_checkpoint`); `resume_from`, one
    of those checkpoints, continues the run exactly where it stopped.
    """
    parts = setup_training(model, data, cfg, accelerator)
    fingerprint = data_fingerprint(data)
    run, best = new_run_state(), None
    if resume_from is not None:
        run, best = read_checkpoint(resume_from, fingerprint, cfg, accelerator)
    prepared = prepare_stage(accelerator, parts, cfg, stage_at(run["epoch"], cfg))
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from}: {run['epoch']} epoch(s) and {run['step']} step(s) done")
    while run["epoch"] < cfg.epochs and run["stop"] is None:
        epoch = run["epoch"]
        stage = stage_at(epoch, cfg)
        if epoch > 0 and stage != stage_at(epoch - 1, cfg):
            run["since_best"] = 0  # the new stage gets its own patience
            what = "the whole backbone" if cfg.unfreeze == ALL_STAGES else f"the last {cfg.unfreeze} backbone stage(s)"
            accelerator.print(f"stage 2: unfreezing {what} at lr {cfg.lr_finetune:g}")
        if stage != prepared.stage:
            prepared = prepare_stage(accelerator, parts, cfg, stage, prepared)
        seed_epoch(cfg, epoch, accelerator, parts)
        best = run_epoch(prepared, parts, data, cfg, accelerator, run, best)
        if cfg.keep_checkpoints:
            save_checkpoint(accelerator, run, best, fingerprint, cfg)
    accelerator.unwrap_model(prepared.model).to(memory_format=torch.contiguous_format)  # safetensors saves contiguous
    run["history"]["best_epoch"] = best["epoch"]
    return FitResult(run["history"], best["epoch"], best["score"], best["state"], best["probs"], best["targets"],
                     best["mask"], best["val_loss"], run["epoch"], run["stop"] == "early_stopping", run["seconds"],
                     parts.pos_weight.tolist(), run["decode_failures"], accelerator.num_processes,
                     accelerator.mixed_precision, str(resume_from) if resume_from else None)


def run_epoch(prepared: Prepared, parts: TrainingParts, data: AttrData, cfg: TrainConfig, accelerator: Accelerator,
              run: dict, best: dict | None) -> dict:
    """Train one epoch, validate, record it, update early stopping; returns the best epoch so far."""
    epoch, start = run["epoch"], time.time()
    if parts.head_stage is not None and prepared.stage == "head":
        train_loss, (val_loss, probs, targets, mask) = parts.head_stage.run_epoch(
            prepared.model, prepared.optimizer, prepared.val_loader, parts.loss_fn, accelerator, run, epoch)
    else:
        train_loss = train_one_epoch(prepared.model, prepared.train_loader, prepared.optimizer, parts.loss_fn,
                                     accelerator, run, cfg, epoch)
        val_loss, probs, targets, mask = evaluate(prepared.model, prepared.val_loader, parts.loss_fn, accelerator)
    failed = take_decode_failures(parts, accelerator)
    val_map = evaluate_predictions(probs, targets, mask, data.label_names, [0.5] * len(data.label_names))["mAP"]
    score = val_map if val_map is not None else -val_loss
    improved = best is None or score > best["score"] + 1e-6
    seconds = time.time() - start
    _record_epoch(run["history"], epoch, prepared.stage, train_loss, val_loss, val_map, prepared.optimizer, seconds,
                  len(failed))
    accelerator.print(
        f"epoch {epoch + 1}/{cfg.epochs} [{prepared.stage}] train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
        f"val_mAP {_fmt(val_map)}  ({seconds:.0f}s){'  * best' if improved else ''}"
        + (f"\n  {len(failed)} image(s) failed to decode and were left out: {', '.join(failed[:5])}"
           f"{' ...' if len(failed) > 5 else ''}" if failed else "")
    )
    for name in failed:
        run["decode_failures"][name] = run["decode_failures"].get(name, 0) + 1
    if improved:
        state_dict = accelerator.unwrap_model(prepared.model).state_dict()
        best = {"score": score, "epoch": epoch + 1,
                "state": {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                          for k, v in state_dict.items()},  # contiguous: safetensors stores no channels_last
                "probs": probs, "targets": targets, "mask": mask, "val_loss": val_loss}
    run["since_best"] = 0 if improved else run["since_best"] + 1
    run["epoch"], run["seconds"] = epoch + 1, run["seconds"] + seconds
    run["stop"] = stop_reason(run, cfg, accelerator)
    return best


def stop_reason(run: dict, cfg: TrainConfig, accelerator: Accelerator) -> str | None:
    """Why training ends after the epoch just done ("max_steps", "early_stopping"), or None to go on."""
    if cfg.max_steps and run["step"] >= cfg.max_steps:
        accelerator.print(f"reached --max-steps {cfg.max_steps}")
        return "max_steps"
    in_last_stage = stage_at(run["epoch"] - 1, cfg) == stage_at(cfg.epochs - 1, cfg)
    if run["since_best"] >= cfg.early_stop_patience and in_last_stage and run["epoch"] < cfg.epochs:
        accelerator.print(f"early stopping: no better validation mAP for {run['since_best']} epochs")
        return "early_stopping"
    return None


def take_decode_failures(parts: TrainingParts, accelerator: Accelerator) -> list[str]:
    """Images that failed to decode this epoch on any process, each named once."""
    failed = parts.failures[0].take() + parts.failures[1].take()
    return sorted(set(gather_object(failed))) if accelerator.num_processes > 1 else sorted(set(failed))


def _record_epoch(history, epoch, stage, train_loss, val_loss, val_map, optimizer, seconds, bad_images):
    lrs = {g["part"]: g["lr"] for g in optimizer.param_groups}
    row = {"epoch": epoch + 1, "stage": stage, "train_loss": train_loss, "val_loss": val_loss, "val_mAP": val_map,
           "lr_head": lrs.get("head"), "lr_backbone": lrs.get("backbone") if stage == "finetune" else 0.0,
           "seconds": round(seconds, 2), "bad_images": bad_images}
    for key, value in row.items():
        history["epochs"][key].append(value)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- checkpoints and resume


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first; a temporary folder left by a kill mid-write is not one."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"epoch_\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The checkpoint --resume names: the latest in OUTPUT/checkpoints, or PATH (a checkpoint, or a folder of them)."""
    folder = checkpoint_root(output_dir) if resume == LATEST else Path(resume)
    if (folder / STATE_FILE).is_file():
        return folder
    if (folder / CHECKPOINTS).is_dir():
        folder = folder / CHECKPOINTS
    found = list_checkpoints(folder)
    if not found:
        raise AttrclfError(f"--resume: no checkpoint in '{folder}' (a run writes one there after each epoch); "
                           f"start without --resume, or pass --resume PATH to a checkpoint folder")
    return found[-1]


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run; a fresh run never overwrites an interrupted one's."""
    if cfg.resume:
        return find_checkpoint(cfg.resume, cfg.output_dir)
    existing = list_checkpoints(checkpoint_root(cfg.output_dir))
    if existing:
        raise AttrclfError(
            f"'{existing[-1].parent}' holds checkpoints of an interrupted run (latest: {existing[-1].name}): "
            f"pass --resume to continue it, or delete that folder or choose another --output-dir to start afresh"
        )
    return None


def save_checkpoint(accelerator: Accelerator, run: dict, best: dict, fingerprint: str, cfg: TrainConfig) -> Path:
    """The whole training state after an epoch, in OUTPUT/checkpoints/epoch_NNNN; the last --keep-checkpoints stay.

    accelerate's `save_state` writes the model, optimizer, gradient scaler and RNG states; the best epoch's weights and
    validation predictions go to safetensors; the loop's state (epoch, step, early stopping, history, data
    fingerprint) to JSON. Everything is written into a temporary folder that is renamed when complete, so a kill
    mid-write leaves the previous checkpoint the latest.
    """
    root = checkpoint_root(cfg.output_dir)
    final, temporary = root / f"epoch_{run['epoch']:04d}", root / f".tmp-epoch_{run['epoch']:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        safetensors.torch.save_file(best["state"], temporary / BEST_WEIGHTS)
        safetensors.numpy.save_file({"probs": best["probs"], "targets": best["targets"],
                                     "mask": best["mask"].astype(np.uint8)}, temporary / BEST_PREDICTIONS)
        saved = {**run, "fingerprint": fingerprint,
                 "world_size": accelerator.num_processes, "batch_size": cfg.batch_size, "train_config": asdict(cfg),
                 "best": {"score": best["score"], "epoch": best["epoch"], "val_loss": best["val_loss"]}}
        (temporary / STATE_FILE).write_text(json.dumps(saved))
        shutil.rmtree(final, ignore_errors=True)  # an older run's epoch of the same number (resumed from further back)
        os.rename(temporary, final)
        for old in list_checkpoints(root)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path, fingerprint: str, cfg: TrainConfig, accelerator: Accelerator) -> tuple[dict, dict]:
    """The loop's state and best epoch from a checkpoint, after checking that it comes from this data and layout."""
    saved = json.loads((path / STATE_FILE).read_text())
    if saved["fingerprint"] != fingerprint:
        raise AttrclfError(
            f"--resume: checkpoint '{path}' was trained on other data (label names, images, labels or split differ); "
            f"resume with the same --data / --label-columns / --val-fraction / --seed, or start afresh"
        )
    if (saved["world_size"], saved["batch_size"]) != (accelerator.num_processes, cfg.batch_size):
        raise AttrclfError(
            f"--resume: checkpoint '{path}' was written by {saved['world_size']} process(es) at --batch-size "
            f"{saved['batch_size']}; this run has {accelerator.num_processes} at {cfg.batch_size}. Resume with the "
            f"same number of processes and batch size (the step count and learning-rate schedule depend on both)"
        )
    changed = [k for k, v in asdict(cfg).items() if k not in RESUME_FREE and saved["train_config"].get(k) != v]
    if changed:
        accelerator.print(f"warning: resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
    predictions = safetensors.numpy.load_file(path / BEST_PREDICTIONS)
    best = {**saved.pop("best"), "state": safetensors.torch.load_file(path / BEST_WEIGHTS),
            "probs": predictions["probs"], "targets": predictions["targets"], "mask": predictions["mask"].astype(bool)}
    run = {k: saved[k] for k in new_run_state()}
    return run, best


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
        "world_size": result.world_size,
        "mixed_precision": result.mixed_precision,
        "resumed_from": result.resumed_from,
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
            # images that passed the pre-check but failed to decode during training: {name: epochs it failed in}
            "decode_failures": sum(result.decode_failures.values()),
            "decode_failed_images": result.decode_failures,
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
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (staging / "history.json").write_text(json.dumps(result.history))
        plot_loss_curves(result.history, staging / "loss_curve.png",
                         title=f"attrclf: {model.config.backbone}, {len(model.config.label_names)} attributes, "
                               f"best validation mAP {_fmt(metrics['validation']['mAP'])}")
        plot_pr_curves(result.val_probs, result.val_targets, result.val_mask, model.config.label_names,
                       model.config.thresholds, staging / "pr_curves.png")
        render_card(asdict(model.config), metrics, asdict(cfg)).save(staging / "README.md")
        model.save_pretrained(staging)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:
            os.replace(staging / name, output_dir / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return written


def train_and_save(cfg: TrainConfig, data: AttrData, accelerator: Accelerator) -> dict:
    """Build, train (or resume), finalize and write one model to cfg.output_dir; returns its metrics.json content."""
    resume_from = resume_point(cfg)
    set_seed(cfg.seed)
    model = build_model(cfg, data.label_names)
    accelerator.print(
        f"model: {cfg.backbone} ({'pretrained' if cfg.pretrained else 'from scratch'}), input "
        f"{model.config.input_size[1]}px; stages: head {cfg.head_epochs} epoch(s), then unfreeze "
        f"{cfg.unfreeze_stages}; device {accelerator.device}, world size {accelerator.num_processes} "
        f"(process(es) x batch {cfg.batch_size}), mixed precision {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} thread(s) each"
    )
    result = fit(model, data, cfg, accelerator, resume_from)
    metrics = finalize(model, result, data, cfg)
    if accelerator.is_main_process:
        written = write_outputs(model, metrics, result, cfg, Path(cfg.output_dir))
        shutil.rmtree(checkpoint_root(cfg.output_dir), ignore_errors=True)  # the run is complete: nothing to resume
        accelerator.print(summary_table(metrics))
        accelerator.print(f"saved to {cfg.output_dir}/: {', '.join(written)}")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return metrics


def cross_validate(cfg: TrainConfig, data: AttrData, accelerator: Accelerator) -> dict:
    """--folds K: one model per fold in OUTPUT/fold_k/, then OUTPUT/cv_summary.json; returns the summary.

    With --resume, folds whose model is complete are read back, the interrupted one continues from its checkpoint.
    """
    fold_metrics = []
    for k, fold in enumerate(make_folds(data, cfg.folds, cfg.seed), start=1):
        folder = Path(cfg.output_dir) / f"fold_{k}"
        has_checkpoints = bool(list_checkpoints(checkpoint_root(folder)))
        if cfg.resume and not has_checkpoints and (folder / "metrics.json").is_file():
            accelerator.print(f"fold {k}/{cfg.folds}: complete, read from {folder}/metrics.json")
            fold_metrics.append(json.loads((folder / "metrics.json").read_text()))
            continue
        accelerator.print(f"fold {k}/{cfg.folds}: {len(fold.train)} train / {len(fold.validation)} validation images")
        fold_cfg = replace(cfg, output_dir=str(folder), folds=None, resume=LATEST if cfg.resume and has_checkpoints else None)
        fold_metrics.append(train_and_save(fold_cfg, fold, accelerator))
    summary = cv_summary(fold_metrics)
    if accelerator.is_main_process:
        path = Path(cfg.output_dir) / "cv_summary.json"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(summary, indent=2))
        os.replace(temporary, path)
        accelerator.print(cv_table(summary))
        accelerator.print(f"saved to {cfg.output_dir}/: cv_summary.json, " + ", ".join(f"fold_{k}/" for k in range(1, cfg.folds + 1)))
    accelerator.wait_for_everyone()
    return summary


def cv_summary(fold_metrics: list[dict]) -> dict:
    """Per-fold validation figures, and their mean and (population, numpy's default) standard deviation."""
    folds = [{"fold": k, "validation_images": m["data"]["validation_images"], "best_epoch": m["best_epoch"],
              **{name: m["validation"][name] for name in CV_FIGURES}} for k, m in enumerate(fold_metrics, start=1)]
    summary = {}
    for name in CV_FIGURES:
        values = [row[name] for row in folds if row[name] is not None]
        summary[name] = {"mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values)) if values else None, "folds": len(values)}
    return {"folds": folds, "summary": summary,
            "note": "std is the population standard deviation over the folds (ddof=0); a fold without a figure "
                    "(no attribute with both classes among its known labels) is left out of its mean"}


def cv_table(summary: dict) -> str:
    """The cross-validation table printed at the end of --folds."""
    lines = [f"{'fold':<6} {'images':>6} " + " ".join(f"{name:>24}" for name in CV_FIGURES)]
    for row in summary["folds"]:
        lines.append(f"{row['fold']:<6} {row['validation_images']:>6} "
                     + " ".join(f"{_fmt2(row[name]):>24}" for name in CV_FIGURES))
    lines.append(f"{'mean':<6} {'':>6} " + " ".join(f"{_fmt2(summary['summary'][n]['mean']):>24}" for n in CV_FIGURES))
    lines.append(f"{'std':<6} {'':>6} " + " ".join(f"{_fmt2(summary['summary'][n]['std']):>24}" for n in CV_FIGURES))
    return "\n".join(lines)


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
