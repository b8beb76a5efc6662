"""TEMPORARY re-exports for engine.py during the split; the lead removes this file at merge."""

# data.py was split into labels, images, sources, splits, transforms, loader, augment (and losses for the NA policy).
# engine.py, tests/test_scale.py and tests/test_speed.py still import these names from here. Four keep their old
# calling convention for engine.py only: engine.py passes arguments past the fourth by position (the new signatures
# take them by keyword) and reads label_counts as a dict (the new one returns a LabelCounts).

import dataclasses

from . import labels as _labels
from . import loader as _loader
from . import sources as _sources
from . import transforms as _transforms
from .augment import BatchMixer
from .images import load_image
from .labels import compute_pos_weight, training_counts
from .loader import DecodeFailures, balanced_sample_weights, collate
from .losses import NA_POLICIES, apply_na_policy
from .sources import AttrData
from .splits import data_fingerprint, make_folds
from .transforms import eval_transform

__all__ = [
    "NA_POLICIES", "AttrData", "BatchMixer", "DecodeFailures", "apply_na_policy", "balanced_sample_weights", "collate",
    "compute_pos_weight", "data_fingerprint", "eval_transform", "label_counts", "load_image", "make_folds",
    "make_loader", "prepare_data", "train_transform", "training_counts",
]


def prepare_data(data, images=None, labels=None, label_columns=None, group_column=None, val_fraction=0.2, seed=42):
    return _sources.prepare_data(data, images, labels, label_columns, group_column=group_column,
                                 val_fraction=val_fraction, seed=seed)


def make_loader(ds, transform, batch_size, shuffle, num_workers=0, seed=0, sample_weights=None, failures=None,
                channels_last=False):
    return _loader.make_loader(ds, transform, batch_size, shuffle, num_workers=num_workers, seed=seed,
                               sample_weights=sample_weights, failures=failures, channels_last=channels_last)


def train_transform(config, crop_scale=0.5, hflip=0.5, color_jitter=0.3, random_erasing=0.1):
    return _transforms.train_transform(config, crop_scale=crop_scale, hflip=hflip, color_jitter=color_jitter,
                                       random_erasing=random_erasing)


def label_counts(labels, num_labels) -> dict:
    counts = _labels.label_counts(labels, num_labels)
    return {**dataclasses.asdict(counts), "known": counts.known}
