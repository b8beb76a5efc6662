"""k-fold cross-validation: folds partition the images by group; --folds writes K models and their summary."""

import json

import numpy as np
import pytest
from accelerate import Accelerator

from attrclf.crossval import cross_validate, cv_summary, cv_table
from attrclf.errors import AttrclfError
from attrclf.splits import make_folds

from .conftest import OUTPUT_FILES, tiny_config, tiny_split


def test_folds_partition_the_images_and_keep_groups_together(tiny_data):
    data = tiny_split(tiny_data)
    folds = make_folds(data, 5, seed=1)
    validation_sets = [set(f.validation["image_name"]) for f in folds]
    everything = set(data.train["image_name"]) | set(data.validation["image_name"])
    assert sum(len(s) for s in validation_sets) == len(everything) == 72
    assert set().union(*validation_sets) == everything
    assert sorted(len(s) for s in validation_sets) == [12, 15, 15, 15, 15]  # 24 groups of 3 over 5 folds
    for fold, names in zip(folds, validation_sets, strict=True):
        assert set(fold.train["image_name"]) == everything - names
        assert not set(fold.train["group"]) & set(fold.validation["group"])
    assert [set(f.validation["image_name"]) for f in make_folds(data, 5, seed=1)] == validation_sets
    with pytest.raises(AttrclfError, match="at most one per group"):
        make_folds(data, 25, seed=1)


@pytest.mark.slow  # trains two folds
def test_cross_validation_writes_k_models_and_the_summary_of_their_figures(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path / "cv", epochs=1, folds=2)
    data = tiny_split(tiny_data)
    summary = cross_validate(cfg, data, Accelerator())
    out = tmp_path / "cv"
    assert sorted(p.name for p in out.iterdir()) == ["cv_summary.json", "fold_1", "fold_2"]
    assert json.loads((out / "cv_summary.json").read_text()) == summary
    fold_metrics = [json.loads((out / f"fold_{k}" / "metrics.json").read_text()) for k in (1, 2)]
    assert all(sorted(p.name for p in (out / f"fold_{k}").iterdir()) == OUTPUT_FILES for k in (1, 2))
    assert [m["data"]["validation_images"] for m in fold_metrics] == [36, 36]  # 24 groups of 3, 12 per fold
    for name in ("mAP", "f1_macro_at_0.5", "f1_macro_tuned_crossfit"):
        values = [m["validation"][name] for m in fold_metrics]
        assert [row[name] for row in summary["folds"]] == values
        assert summary["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert summary["summary"][name]["std"] == pytest.approx(np.std(values))


def test_cv_summary_and_table_of_hand_made_fold_metrics():
    def fold(images, best, m, f1, crossfit):
        return {"data": {"validation_images": images}, "best_epoch": best,
                "validation": {"mAP": m, "f1_macro_at_0.5": f1, "f1_macro_tuned_crossfit": crossfit}}

    summary = cv_summary([fold(10, 2, 0.5, 0.25, None), fold(12, 3, 0.75, 0.75, 0.5)])
    assert summary["folds"][1] == {"fold": 2, "validation_images": 12, "best_epoch": 3, "mAP": 0.75,
                                   "f1_macro_at_0.5": 0.75, "f1_macro_tuned_crossfit": 0.5}
    assert summary["summary"]["mAP"] == {"mean": 0.625, "std": 0.125, "folds": 2}
    assert summary["summary"]["f1_macro_tuned_crossfit"] == {"mean": 0.5, "std": 0.0, "folds": 1}  # None left out
    lines = cv_table(summary).splitlines()
    assert lines[0].split() == ["fold", "images", "mAP", "f1_macro_at_0.5", "f1_macro_tuned_crossfit"]
    assert lines[1].split() == ["1", "10", "0.500", "0.250", "n/a"]
    assert lines[3].split() == ["mean", "0.625", "0.500", "0.500"] and lines[4].split() == ["std", "0.125", "0.250",
                                                                                            "0.000"]
