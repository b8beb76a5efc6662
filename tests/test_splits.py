"""attrclf.splits: the grouped split, folds and the data fingerprint, on hand examples."""

import numpy as np
from datasets import Dataset

from attrclf.sources import AttrData, load_source
from attrclf.splits import data_fingerprint, fold_of_rows, make_folds, split_by_group

from .conftest import error_of


def test_split_keeps_groups_together_and_is_seeded(labels_factory):
    lines = [f"i{n:03d}.png {n % 2} 1 g{n // 5}" for n in range(100)]
    root = labels_factory(["img a b grp", *lines])
    source = load_source(root, group_column="grp")
    assert source.label_names == ["a", "b"]
    train, val = split_by_group(source.splits["train"], 0.2, seed=3)
    assert not set(train["group"]) & set(val["group"])
    assert 15 <= len(val) <= 25
    again_train, again_val = split_by_group(source.splits["train"], 0.2, seed=3)
    assert again_val["image_name"] == val["image_name"]


def table(groups: list[str]) -> Dataset:
    return Dataset.from_dict({"image_name": [f"i{n}" for n in range(len(groups))], "group": groups,
                              "labels": [[n % 2] for n in range(len(groups))]})


def test_split_errors():
    assert "--val-fraction must be between 0 and 1 (got 1.5)" in error_of(lambda: split_by_group(table(["a"]), 1.5, 0))
    assert "cannot split 3 images in 1 groups" in error_of(lambda: split_by_group(table(["g", "g", "g"]), 0.3, 0))


def test_fold_of_rows_balances_whole_groups():
    # group sizes 4, 3, 2, 1 into 2 folds, largest first into the emptier fold: {4, 1} and {3, 2}, 5 rows each
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]
    fold = fold_of_rows(groups, 2, seed=0)
    by_group = {g: {int(f) for f, h in zip(fold, groups, strict=True) if h == g} for g in "abcd"}
    assert all(len(folds) == 1 for folds in by_group.values())
    assert by_group["a"] == by_group["d"] != by_group["b"] == by_group["c"]
    assert np.bincount(fold).tolist() == [5, 5]
    assert np.array_equal(fold_of_rows(groups, 2, seed=0), fold)
    assert "--folds 5: need at least 2 folds and at most one per group (4 groups in 10 images)" in error_of(
        lambda: fold_of_rows(groups, 5, seed=0))


def attr_data(groups: list[str]) -> AttrData:
    ds = table(groups)
    half = len(groups) // 2
    return AttrData(ds.select(range(half)), ds.select(range(half, len(groups))), ["a"], "hand", "by hand",
                    skipped=[{"image": "x", "reason": "r"}], warnings=["w"])


def test_make_folds_pools_both_splits_and_keeps_the_rest():
    data = attr_data([f"g{n}" for n in range(9)])
    folds = make_folds(data, 3, seed=4)
    validations = [set(f.validation["image_name"]) for f in folds]
    assert sorted(len(v) for v in validations) == [3, 3, 3]
    assert set().union(*validations) == {f"i{n}" for n in range(9)}
    for k, fold in enumerate(folds):
        assert not set(fold.train["image_name"]) & validations[k] and len(fold.train) == 6
        assert fold.split == f"fold {k + 1} of 3 (grouped k-fold over 9 images, seed=4)"
        assert (fold.label_names, fold.source, fold.skipped, fold.warnings) == (
            ["a"], "hand", [{"image": "x", "reason": "r"}], ["w"])


def test_fingerprint_changes_with_what_training_saw():
    data = attr_data(["a", "b", "c", "d"])
    same = attr_data(["a", "b", "c", "d"])
    assert data_fingerprint(data) == data_fingerprint(same) and len(data_fingerprint(data)) == 64
    relabelled = attr_data(["a", "b", "c", "d"])
    relabelled.train = relabelled.train.map(lambda row: {"labels": [1 - row["labels"][0]]})
    assert data_fingerprint(relabelled) != data_fingerprint(data)
    resplit = attr_data(["a", "b", "c", "d"])
    resplit.split = "another split"
    assert data_fingerprint(resplit) != data_fingerprint(data)

