"""Rows -> batches: decode and transform each image, collate `(pixel_values, targets, mask)`, sample, count failures.

A batch is `(pixel_values (B, C, H, W), targets (B, A) float with NA as 0, mask (B, A) bool, True = known)`.
An image that passed the pre-check (`images.drop_unreadable`) but fails to decode during training is left out of
its batch and counted in `DecodeFailures`, which metrics.json reports.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .errors import AttrclfError
from .images import load_image
from .labels import label_counts
from .preemption import leave_stop_signals_to_the_main_process

if TYPE_CHECKING:
    from datasets import Dataset


class DecodeFailures:
    """How often each image of a split failed to decode during training (it passed the pre-check, then broke).

    The counts live in shared memory, so DataLoader worker processes add to the same table the training loop reads.
    """

    def __init__(self, image_names: list[str]):
        self.image_names = list(image_names)
        self.row = {name: i for i, name in enumerate(self.image_names)}
        self.counts = torch.zeros(len(self.image_names), dtype=torch.int32).share_memory_()

    def add(self, image_name: str) -> None:
        self.counts[self.row[image_name]] += 1

    def take(self) -> list[str]:
        """Names of the images that failed since the last call (each once), and start counting afresh."""
        failed = [self.image_names[i] for i in torch.nonzero(self.counts).flatten().tolist()]
        self.counts.zero_()
        return failed


class BatchTransform:
    """`Dataset.with_transform` function: decode each image (None when it fails) and apply `transform`."""

    def __init__(self, transform, failures: DecodeFailures | None = None):
        self.transform = transform
        self.failures = failures

    def __call__(self, batch: dict) -> dict:
        pixel_values = []
        for i, source in enumerate(batch["image"]):
            try:
                pixel_values.append(self.transform(load_image(source)))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pixel_values.append(None)
                if self.failures is not None:
                    self.failures.add(batch["image_name"][i])
        return {"pixel_values": pixel_values, "labels": batch["labels"]}


def collate(items: list[dict], *, keep_failed: bool = False,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items -> (pixel_values (B, C, H, W), targets (B, A) float with NA as 0, mask (B, A) bool, True = known).

    Items whose image failed to decode are dropped, or with `keep_failed` kept as a blank image whose labels are all
    NA: evaluation keeps every batch at its size, so that `gather_for_metrics` can drop the padding of the last batch
    across processes by position, and a failed image still adds nothing to a loss or a metric.
    `channels_last` lays the pixels out NHWC, done here in the loader's workers so the training loop gets batches in
    the layout a channels_last model computes fastest on.
    """
    good = [item for item in items if item["pixel_values"] is not None]
    if not good:
        raise AttrclfError("every image in a batch failed to decode")
    if keep_failed:
        blank = torch.zeros_like(good[0]["pixel_values"])
        items = [item if item["pixel_values"] is not None else
                 {"pixel_values": blank, "labels": [None] * len(item["labels"])} for item in items]
    else:
        items = good
    pixel_values = torch.stack([item["pixel_values"] for item in items])
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    labels = [item["labels"] for item in items]
    mask = torch.tensor([[v is not None for v in row] for row in labels], dtype=torch.bool)
    targets = torch.tensor([[float(v or 0) for v in row] for row in labels], dtype=torch.float32)
    if "original_size" in items[0]:  # uint8 rows for attrclf.device_augment, with each image's (width, height)
        return pixel_values, targets, mask, torch.tensor([item["original_size"] for item in items])
    return pixel_values, targets, mask


def make_loader(
    ds: Dataset,
    transform,
    batch_size: int,
    shuffle: bool,
    *,
    num_workers: int = 0,
    seed: int = 0,
    sample_weights: list[float] | None = None,
    failures: DecodeFailures | None = None,
    channels_last: bool = False,
    rows=None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of `collate` batches; training loaders drop a ragged last batch (BatchNorm needs >= 2).

    With `sample_weights` (one per row, see `balanced_sample_weights`) a seeded WeightedRandomSampler draws len(ds)
    rows with replacement per epoch instead of shuffling. Accelerate shards it correctly over processes: every
    process draws the same sequence (it synchronises the sampler's generator from process 0 at each epoch) and keeps
    its own share of the batches.

    Evaluation loaders (no shuffle) keep images that fail to decode as NA placeholders (see `collate`). Workers are
    started afresh each epoch (not persistent) so that their random streams come from the loader's generator, which
    training re-seeds every epoch: a resumed epoch draws the same augmentations as an uninterrupted one.
    `rows` replaces the per-row decode + `transform` (attrclf.decodecache: cached rows, uint8 rows for the device).
    """
    drop_last = shuffle and len(ds) > batch_size
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if sample_weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(ds), replacement=True, generator=generator)
    return torch.utils.data.DataLoader(
        ds.with_transform(rows or BatchTransform(transform, failures)),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, keep_failed=not shuffle, channels_last=channels_last),
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=leave_stop_signals_to_the_main_process if num_workers else None,
    )


def balanced_sample_weights(labels: list[list[int | None]], num_labels: int, cap: float | None = None) -> list[float]:
    """Per-image sampling weights from rare known positives (the class-balanced sampler).

    weight(image) = max over the attributes the image is KNOWN positive for of known(a) / positives(a), i.e. one over
    the positive frequency among a's known labels; 1 for an image with no known positive. NA never raises a weight.
    `cap` bounds the weights so that one image of a very rare attribute is not drawn hundreds of times an epoch.
    """
    counts = label_counts(labels, num_labels)
    inverse_frequency = [known / pos if pos else 1.0 for pos, known in zip(counts.positive, counts.known, strict=True)]
    weights = [max([1.0] + [w for v, w in zip(row, inverse_frequency, strict=True) if v == 1]) for row in labels]
    return [min(w, cap) if cap else w for w in weights]
