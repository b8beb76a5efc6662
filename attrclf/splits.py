"""Which images train and which validate: the seeded grouped split, k folds, and the fingerprint of a split.

A group (an identity, a source photo, ...; by default each image alone) is never cut between train and validation,
so validation measures images unlike any the model trained on. Every split is seeded, so every process of a
multi-process run computes the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset, concatenate_datasets

from .errors import AttrclfError

if TYPE_CHECKING:
    from .sources import AttrData


def split_by_group(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split that keeps each group on one side; about `val_fraction` of the rows go to validation.

    Returns:
        (train, validation).
    """
    if not 0 < val_fraction < 1:
        raise AttrclfError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    groups = np.asarray(ds["group"])
    unique, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    target = val_fraction * len(ds)
    in_val = np.zeros(len(unique), dtype=bool)
    taken = 0
    for g in order:
        if taken >= target:
            break
        in_val[g] = True
        taken += sizes[g]
    val_rows = in_val[inverse]
    if val_rows.all() or not val_rows.any():
        raise AttrclfError(
            f"cannot split {len(ds)} images in {len(unique)} groups into train and validation "
            f"(--val-fraction {val_fraction}); add images or provide a validation split"
        )
    return ds.select(np.flatnonzero(~val_rows)), ds.select(np.flatnonzero(val_rows))


def fold_of_rows(groups: list[str], folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of every row; rows of a group share a fold; fold sizes as even as the groups allow.

    Groups are shuffled (seeded), then taken largest first, each into the fold that holds the fewest rows so far.
    """
    unique, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if folds < 2 or folds > len(unique):
        raise AttrclfError(f"--folds {folds}: need at least 2 folds and at most one per group "
                           f"({len(unique)} groups in {len(groups)} images)")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group, rows_in_fold = np.zeros(len(unique), dtype=int), np.zeros(folds, dtype=int)
    for g in order:
        fold = int(np.argmin(rows_in_fold))
        fold_of_group[g] = fold
        rows_in_fold[fold] += sizes[g]
    return fold_of_group[inverse]


def make_folds(data: AttrData, folds: int, seed: int) -> list[AttrData]:
    """K-fold cross-validation: train and validation pooled; fold k validates the model trained on the other folds."""
    pool = concatenate_datasets([data.train, data.validation])
    fold = fold_of_rows(pool["group"], folds, seed=seed)
    return [
        dataclasses.replace(
            data, train=pool.select(np.flatnonzero(fold != k)), validation=pool.select(np.flatnonzero(fold == k)),
            split=f"fold {k + 1} of {folds} (grouped k-fold over {len(pool)} images, seed={seed})",
        )
        for k in range(folds)
    ]


def data_fingerprint(data: AttrData) -> str:
    """sha256 of what a training run saw: label names, the split description, and each split's images and labels.

    A checkpoint stores it, so that a run is never resumed on other data.
    """
    content = {"label_names": data.label_names, "split": data.split,
               **{name: [list(ds["image_name"]), list(ds["labels"])] for name, ds in
                  (("train", data.train), ("validation", data.validation))}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
