"""The head-only stage on cached backbone features: the frozen backbone runs once per image, the head trains on that.

While the backbone is frozen its BatchNorm layers stay in eval mode (AttrClassifier.train) and it has no dropout, so
its output depends on the image alone: the backbone runs once over the training images (eval transform, no
augmentation: the trade-off) and once over the validation images, and each head epoch trains and validates the head
on those features. Validation is exact: the same logits the whole model gives.

What is stored is what the head reads, `AttrClassifier.features`: pooled (N, F) vectors for the MLP head, kept where
the model runs; for the query head the unpooled maps, F x H' x W' floats per image (ViT: tokens x width), kept in host
memory and moved to the device batch by batch. For example MobileNetV2 at 224 px: 1,280 x 7 x 7 = 62,720 floats
(245 KiB) per image instead of 1,280 (5 KiB); 10,000 images take 2.4 GiB. At 128 px it is 1,280 x 4 x 4 = 20,480
floats (80 KiB). `--no-head-feature-cache` stores nothing.
"""

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from .config import TrainConfig
from .ema import update_ema
from .loader import make_loader
from .losses import apply_na_policy
from .optim import lr_factor, set_lrs
from .reporting import progress
from .sources import AttrData
from .state import RunState, ValidationResult
from .transforms import eval_transform


def uses_feature_cache(cfg: TrainConfig) -> bool:
    """The head-only stage can train on stored features when it exists and the user did not opt out."""
    batch_level = cfg.mixup or cfg.cutmix or cfg.balanced_sampler  # they act on images / the sampler, not features
    return cfg.head_feature_cache and not batch_level and (cfg.head_epochs > 0 or cfg.unfreeze == 0)


@dataclass
class FeatureSet:
    """What the head reads of each image ((N, F) pooled, or (N, F, H', W') / (N, T, F) for a spatial head) with the
    images' (N, A) targets and bool mask; targets and mask live on the device, spatial features in host memory."""

    features: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, targets, mask) of `rows`, all on the targets' device."""
        device = self.targets.device
        features = self.features[rows.to(self.features.device)].to(device)
        rows = rows.to(device)
        return features, self.targets[rows], self.mask[rows]

    def megabytes(self) -> float:
        """Memory the stored features take."""
        return self.features.numel() * self.features.element_size() / 2**20


@torch.no_grad()
def backbone_features(model, loader, accelerator: Accelerator) -> FeatureSet:
    """What the head reads (`AttrClassifier.features`), backbone in eval mode, with targets and mask, gathered from
    every process."""
    unwrapped = accelerator.unwrap_model(model)
    backbone, spatial = unwrapped.backbone, unwrapped.head.spatial
    was_training = backbone.training
    backbone.eval()
    features, targets, masks = [], [], []
    for pixel_values, target, mask in progress(loader, accelerator, "backbone features"):
        with accelerator.autocast():
            batch = unwrapped.features(pixel_values).float()
        batch, target, mask = accelerator.gather_for_metrics((batch, target, mask))
        features.append(batch.cpu() if spatial else batch)  # maps: host memory (see the module docstring)
        targets.append(target)
        masks.append(mask.bool())
    backbone.train(was_training)
    return FeatureSet(torch.cat(features), torch.cat(targets), torch.cat(masks))


class CachedHeadStage:
    """The head-only stage without a backbone pass per image and epoch (see the module docstring).

    With several processes every process gathers all features and runs the same seeded head updates, so they stay
    identical without syncing. Features are computed on the first epoch, so its time includes them.
    """

    def __init__(self, data: AttrData, cfg: TrainConfig):
        self.data, self.cfg = data, cfg
        self.train_set: FeatureSet | None = None
        self.val_set: FeatureSet | None = None

    def _extract(self, model, val_loader, accelerator: Accelerator) -> None:
        config = accelerator.unwrap_model(model).config
        loader = accelerator.prepare_data_loader(make_loader(
            self.data.train, eval_transform(config), self.cfg.batch_size, False, num_workers=self.cfg.num_workers,
            channels_last=self.cfg.channels_last))
        self.train_set = backbone_features(model, loader, accelerator)
        self.val_set = backbone_features(model, val_loader, accelerator)
        shape = " x ".join(map(str, self.train_set.features.shape[1:]))
        images = len(self.train_set.features) + len(self.val_set.features)
        megabytes = self.train_set.megabytes() + self.val_set.megabytes()
        accelerator.print(f"head stage: cached what the head reads of {images} images, {shape} floats each "
                          f"({megabytes:.0f} MiB)")

    def run_epoch(self, model, optimizer, val_loader, loss_fn, *, accelerator: Accelerator, state: RunState,
                  epoch: int, ema=None) -> tuple[float, dict[str, ValidationResult]]:
        """One head epoch on the features; returns the mean training loss and the validation results of the raw
        weights ("raw") and of the weight average ("ema", when there is one: its frozen backbone is the model's, so
        the same features serve it)."""
        if self.train_set is None:
            self._extract(model, val_loader, accelerator)
        full_model = accelerator.unwrap_model(model)
        train_loss = train_head_epoch(full_model.head, self.train_set, optimizer, loss_fn, accelerator=accelerator,
                                      state=state, cfg=self.cfg, epoch=epoch,
                                      after_step=lambda step: update_ema(ema, full_model, step))
        validations = {"raw": evaluate_head(full_model.head, self.val_set, loss_fn)}
        if ema is not None:
            validations["ema"] = evaluate_head(ema.module.head, self.val_set, loss_fn)
        return train_loss, validations


def train_head_epoch(head, train_set: FeatureSet, optimizer, loss_fn, *, accelerator: Accelerator, state: RunState,
                     cfg: TrainConfig, epoch: int, after_step=None) -> float:
    """One epoch of the head over the stored features, in batches of the global batch size; the mean loss.
    `after_step(step)` runs after each optimiser step (the weight average's update)."""
    batch_size = cfg.batch_size * accelerator.num_processes
    order = torch.randperm(len(train_set.features), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    starts = range(0, len(order) - batch_size + 1 if len(order) > batch_size else 1, batch_size)
    head.train()
    total, count = 0.0, 0
    for start in starts:
        features, batch_targets, batch_mask = train_set.batch(order[start : start + batch_size])
        set_lrs(optimizer, cfg, lr_factor(state.step, len(starts), cfg, anneal=state.anneal))
        batch_targets, batch_mask = apply_na_policy(batch_targets, batch_mask, cfg.na_policy)
        loss = loss_fn(head(features), batch_targets, batch_mask)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        state.step += 1
        if after_step is not None:
            after_step(state.step)
        value = loss.item()
        total, count = total + value, count + 1
        state.record_step(epoch, value)
        if cfg.max_steps and state.step >= cfg.max_steps:
            break
    return total / max(count, 1)


@torch.no_grad()
def evaluate_head(head, val_set: FeatureSet, loss_fn, *, batch_size: int = 256) -> ValidationResult:
    """The validation result from stored validation features, the head run `batch_size` images at a time."""
    head.eval()
    rows = torch.arange(len(val_set.features))
    logits = torch.cat([head(val_set.batch(rows[start : start + batch_size])[0]).float()
                        for start in range(0, max(len(rows), 1), batch_size)])
    return ValidationResult.from_logits(logits, val_set.targets, val_set.mask, loss_fn)
