"""metrics.json as documented, the output folder exactly, and the table printed at the end, from a hand-made fit."""

import json
import re

import numpy as np
import pytest

import attrclf
from attrclf.config import TrainConfig
from attrclf.metrics import evaluate_predictions, tune_thresholds
from attrclf.reporting import finalize, summary_table, write_outputs
from attrclf.state import BestEpoch, EpochRecord, FitResult, History

from .conftest import OUTPUT_FILES, tiny_split

METRICS_KEYS = {"attrclf_version", "validation", "best_epoch", "epochs_run", "stopped_early", "train_seconds",
                "world_size", "num_machines", "mixed_precision", "resumed_from", "data", "pos_weight", "na_policy",
                "threshold_rule", "thresholds_note", "weights", "ema_decay"}


@pytest.fixture
def fitted(tiny_data, tiny_model_factory):
    data = tiny_split(tiny_data)
    model = tiny_model_factory(tuple(data.label_names))
    rng = np.random.default_rng(0)
    targets = np.array([[v or 0 for v in row] for row in data.validation["labels"]], dtype=np.float32)
    mask = np.array([[v is not None for v in row] for row in data.validation["labels"]])
    probs = np.clip(targets * 0.6 + rng.random(targets.shape) * 0.4, 0, 1).astype(np.float32)
    best = BestEpoch(score=0.9, epoch=2, val_loss=0.4, state={k: v.clone() for k, v in model.state_dict().items()},
                     probs=probs, targets=targets, mask=mask)
    epochs = [EpochRecord(epoch=e, stage="finetune", train_loss=0.5, val_loss=0.4, val_mAP=0.9, lr_head=1e-3,
                          lr_backbone=1e-3, seconds=1.0, bad_images=0) for e in (1, 2)]
    history = History(epochs=epochs, best_epoch=2)
    result = FitResult(history, best, epochs_run=2, stopped_early=False, seconds=2.04, pos_weight=[1.0, 2.0, 3.0],
                       decode_failures={"x.png": 2})
    return model, data, result


def test_metrics_json_holds_the_documented_keys_and_the_full_suite_of_the_best_epoch(fitted, tmp_path):
    model, data, result = fitted
    metrics = finalize(model, result, data, TrainConfig(output_dir=str(tmp_path)))
    assert set(metrics) == METRICS_KEYS
    assert set(metrics) <= set(re.findall(r"\w+", attrclf.reporting.__doc__))  # each key is in the docstring
    assert metrics["attrclf_version"] == attrclf.__version__
    best = result.best
    # the default rule: half the best F1, moved onto the scale of the loss's positive weights (1, 2, 3)
    assert metrics["threshold_rule"] == "half-f1"
    assert model.config.thresholds == tune_thresholds(best.probs, best.targets, best.mask, rule="half-f1",
                                                      pos_weight=[1.0, 2.0, 3.0])
    full = evaluate_predictions(best.probs, best.targets, best.mask, data.label_names, model.config.thresholds,
                                rule="half-f1", pos_weight=[1.0, 2.0, 3.0])
    assert metrics["validation"] == {"loss": 0.4, **full}
    assert (metrics["best_epoch"], metrics["epochs_run"], metrics["train_seconds"]) == (2, 2, 2.0)
    assert (metrics["weights"], metrics["ema_decay"]) == (best.weights, 0.9998)
    assert metrics["pos_weight"] == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert metrics["data"]["decode_failures"] == 2 and metrics["data"]["decode_failed_images"] == {"x.png": 2}
    counts = metrics["data"]["validation_counts"]
    assert sum(counts["c"].values()) == 18 and counts["c"]["na"] == int((~best.mask[:, 2]).sum())


def test_write_outputs_writes_the_exact_file_set_and_the_history(fitted, tmp_path):
    model, data, result = fitted
    cfg = TrainConfig(output_dir=str(tmp_path / "out"))
    metrics = finalize(model, result, data, cfg)
    written = write_outputs(model, metrics, result, cfg=cfg, output_dir=tmp_path / "out")
    assert written == OUTPUT_FILES and sorted(p.name for p in (tmp_path / "out").iterdir()) == OUTPUT_FILES
    assert json.loads((tmp_path / "out" / "history.json").read_text()) == result.history.to_dict()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_summary_table_rows():
    row = {"ap": 0.5, "f1_at_0.5": 0.25, "f1": None, "threshold": 0.4, "positives": 3, "negatives": 4, "na": 1}
    metrics = {"validation": {"per_attribute": {"red": row}, "mAP": 0.5, "f1_macro_at_0.5": 0.25,
                              "f1_macro_tuned": None, "f1_macro_tuned_crossfit": 0.125, "f1_micro_tuned": 1.0}}
    lines = summary_table(metrics).splitlines()
    assert lines[0].split() == ["attribute", "AP", "F1@0.5", "F1", "thresh", "pos", "neg", "NA"]
    assert lines[1].split() == ["red", "0.500", "0.250", "n/a", "0.400", "3", "4", "1"]
    assert lines[2] == ("mAP 0.500   macro-F1 at 0.5 0.250   tuned n/a (held-out halves: 0.125)   "
                        "micro-F1 tuned 1.000")
