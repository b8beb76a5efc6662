"""The training loop in one process: validation, per-epoch figures, images that break mid-training."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from attrclf.config import TrainConfig
from attrclf.engine import build_model, evaluate, fit, stop_reason, train_and_save
from attrclf.loader import make_loader
from attrclf.losses import build_loss
from attrclf.metrics import evaluate_predictions, mean_average_precision
from attrclf.optim import lr_factor
from attrclf.reporting import finalize
from attrclf.state import RunState, ValidationResult
from attrclf.transforms import eval_transform

from .conftest import tiny_config, tiny_split, write_labels_dataset


@pytest.mark.slow  # trains 2 epochs
def test_images_that_break_after_the_check_are_counted_and_training_goes_on(tmp_path, tiny_data):
    data_dir = tmp_path / "data"
    lines = (tiny_data / "labels.txt").read_text().splitlines()
    write_labels_dataset(data_dir, lines)
    data = tiny_split(data_dir)
    broken_train, broken_val = data.train["image_name"][3], data.validation["image_name"][5]
    for name in (broken_train, broken_val):  # after the pre-check, before training: a disk or sync fault
        (data_dir / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # 54 = 6 x 9: no image left out
    cfg = tiny_config(data_dir, tmp_path / "out", epochs=2, batch_size=9, keep_checkpoints=0)
    model = build_model(cfg, data.label_names)
    result = fit(model, data, cfg, Accelerator())
    assert result.history.to_dict()["epochs"]["bad_images"] == [2, 2]
    assert result.decode_failures == {broken_train: 2, broken_val: 2}
    assert len(result.history.iterations.loss) == 2 * 6  # training went on
    assert result.best.mask.shape == (18, 3) and not result.best.mask[5].any()  # kept in place, all NA
    # the epoch's own mAP (loss and mAP only) is the full suite's figure on the same predictions
    full = evaluate_predictions(result.best.probs, result.best.targets, result.best.mask, data.label_names)
    record = result.history.epochs[result.best.epoch - 1]
    kept = record.val_mAP_ema if result.best.weights == "ema" else record.val_mAP  # the weight set that was kept
    assert kept == full["mAP"]
    metrics = finalize(model, result, data, cfg)
    assert metrics["data"]["decode_failures"] == 4
    assert metrics["data"]["decode_failed_images"] == {broken_train: 2, broken_val: 2}


def test_evaluate_counts_each_validation_image_once_in_one_process(tmp_path, tiny_data, tiny_model_factory):
    """18 validation images in batches of 4: the ragged last batch is neither dropped nor padded."""
    data = tiny_split(tiny_data)
    model = tiny_model_factory(tuple(data.label_names))
    accelerator = Accelerator()
    loader = make_loader(data.validation, eval_transform(model.config), 4, shuffle=False)
    prepared, loader = accelerator.prepare(model, loader)
    validation = evaluate(prepared, loader, build_loss("bce"), accelerator)
    accelerator.free_memory()
    assert validation.probs.shape == (18, 3)
    assert validation.targets.tolist() == [[float(v or 0) for v in row] for row in data.validation["labels"]]


def test_per_epoch_map_is_the_full_suites_map_on_a_hand_example():
    """Attribute 0: known labels 1, 0, 1 (the NA row left out) -> AP = (1 + 2/3) / 2; attribute 1 has no known
    negative, so it is not evaluated; mAP is attribute 0's AP."""
    probs = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.1], [0.1, 0.7]])
    targets = np.array([[1, 1], [0, 1], [1, 0], [0, 1]])
    mask = np.array([[True, True], [True, True], [True, False], [False, True]])
    assert mean_average_precision(probs, targets, mask) == pytest.approx((1 + 2 / 3) / 2)
    assert mean_average_precision(probs, targets, mask) == evaluate_predictions(probs, targets, mask, ["a", "b"])["mAP"]
    assert mean_average_precision(probs, targets, np.zeros_like(mask)) is None  # nothing known: no figure


def test_per_epoch_map_equals_the_full_suite_and_costs_a_fraction_of_it():
    rng = np.random.default_rng(3)
    probs = rng.random((600, 6)).astype(np.float32)  # the demo's validation set: 600 images, 6 attributes
    targets = (rng.random((600, 6)) < 0.3).astype(np.float32)
    mask = rng.random((600, 6)) > 0.1
    result = ValidationResult(0.5, probs, targets, mask)
    names = [f"a{i}" for i in range(6)]
    assert result.mean_ap() == evaluate_predictions(probs, targets, mask, names, [0.5] * 6)["mAP"]

    def seconds(work, rounds=5, repeats=10):  # the best round: other jobs on a shared machine only add time
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                work()
            times.append((time.perf_counter() - start) / repeats)
        return min(times)

    quick = seconds(result.mean_ap)
    full = seconds(lambda: evaluate_predictions(probs, targets, mask, names, [0.5] * 6))
    assert quick < full / 2, (quick, full)


def test_validation_result_from_logits():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    targets, mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[True, False], [True, True]])
    result = ValidationResult.from_logits(logits, targets, mask, build_loss("bce"))
    known = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask])
    assert result.loss == pytest.approx(known.item())
    np.testing.assert_allclose(result.probs, torch.sigmoid(logits).numpy())
    assert result.mask.dtype == bool and result.targets.tolist() == targets.tolist()


@pytest.mark.slow  # trains 1 epoch twice, and saves
def test_clip_grad_bounds_the_norm_the_optimizer_steps_with(tmp_path, tiny_data, monkeypatch):
    """--clip-grad C: every optimizer step sees a gradient of global L2 norm <= C; without it, larger norms occur."""
    data = tiny_split(tiny_data)
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    found = {}
    for clip in (0.0, 0.01):
        norms.clear()
        cfg = tiny_config(tiny_data, tmp_path / f"out{clip}", epochs=1, head_epochs=0, clip_grad=clip,
                          keep_checkpoints=0)
        train_and_save(cfg, data, Accelerator(cpu=True))
        found[clip] = list(norms)
    assert found[0.0] and min(found[0.0]) > 0.02  # unclipped: well above the bound below
    assert found[0.01] and max(found[0.01]) == pytest.approx(0.01, rel=1e-3)
    assert all(n <= 0.01 * (1 + 1e-3) for n in found[0.01])
    # the card says so (train_config.json records it)
    assert "gradient clipped to global L2 norm 0.01" in (tmp_path / "out0.01" / "README.md").read_text()
    assert "clipped" not in (tmp_path / "out0.0" / "README.md").read_text()


@pytest.mark.slow  # trains 1 epoch and saves
def test_default_pos_weight_is_negatives_over_positives_capped_at_10(tmp_path):
    """The default cap: an attribute 1 in 24 positive weighs its positives 10 (not 23), one 1 in 4 weighs 3; the card
    names the capped attribute."""
    lines = ["img rare common grp"] + [f"i{n:02d}.png {int(n % 24 == 0)} {int(n % 4 == 0)} g{n // 3}"
                                       for n in range(96)]
    data_dir = write_labels_dataset(tmp_path / "d", lines)
    data = tiny_split(data_dir)
    cfg = tiny_config(data_dir, tmp_path / "out", epochs=1, head_epochs=0, keep_checkpoints=0)
    assert cfg.pos_weight_cap == 10
    train_and_save(cfg, data, Accelerator(cpu=True))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    weights, counts = metrics["pos_weight"], metrics["data"]["train_counts"]
    ratio = {name: counts[name]["negative"] / counts[name]["positive"] for name in ("common", "rare")}
    assert ratio["common"] < 10 and weights["common"] == pytest.approx(ratio["common"], abs=1e-4)
    assert ratio["rare"] > 10 and weights["rare"] == 10
    card = (out / "README.md").read_text()
    assert "pos_weight reached its cap (10) for rare:" in card


class Lines:
    """Stands in for the accelerator where only its print is used."""

    def __init__(self):
        self.lines = []

    def print(self, line):
        self.lines.append(line)


def test_early_stopping_anneals_for_its_epochs_then_stops():
    cfg = TrainConfig(data="x", backbone_weights="w", epochs=20, head_epochs=2, early_stop_patience=2,
                      early_stop_anneal=3).resolve()
    out = Lines()
    assert stop_reason(RunState(epoch=2, step=20, since_best=2), cfg, out) is None  # the head stage never stops
    run = RunState(epoch=6, step=60, since_best=1)
    assert stop_reason(run, cfg, out) is None and run.anneal is None
    run.epoch, run.step, run.since_best = 7, 70, 2  # the plateau: the anneal starts from here
    assert stop_reason(run, cfg, out) is None and run.anneal == {"step": 70, "epoch": 7, "epochs": 3}
    assert "annealing the learning rate over the next 3 epoch(s)" in out.lines[-1]
    for epoch, since_best in ((8, 0), (9, 1)):  # a better epoch inside the anneal neither ends nor extends it
        run.epoch, run.step, run.since_best = epoch, epoch * 10, since_best
        assert stop_reason(run, cfg, out) is None and run.anneal["step"] == 70
    run.epoch, run.step, run.since_best = 10, 100, 2
    assert stop_reason(run, cfg, out) == "early_stopping" and "annealed over 3 epoch(s)" in out.lines[-1]
    # fewer epochs left than the anneal's: it ends with the run
    short = RunState(epoch=18, step=180, since_best=2)
    assert stop_reason(short, cfg, out) is None and short.anneal["epochs"] == 2
    # 0: stops at the plateau, as before the option
    at_once = RunState(epoch=7, step=70, since_best=2)
    assert stop_reason(at_once, dataclasses.replace(cfg, early_stop_anneal=0), out) == "early_stopping"
    assert at_once.anneal is None


@pytest.mark.slow  # trains 5 small epochs and saves
def test_a_run_anneals_after_its_plateau_keeps_a_better_annealed_epoch_and_stops(tmp_path, tiny_data, monkeypatch):
    """Validation mAP (scripted) 0.5, 0.6, 0.6 -> plateau after epoch 3 (patience 1): epochs 4-5 anneal the learning
    rate to the floor, epoch 4's better mAP becomes the best epoch, and the run stops after epoch 5 of 8."""
    scores = iter([0.5, 0.6, 0.6, 0.7, 0.65])
    monkeypatch.setattr(ValidationResult, "mean_ap", lambda self: next(scores))
    cfg = tiny_config(tiny_data, tmp_path / "out", epochs=8, head_epochs=1, early_stop_patience=1,
                      early_stop_anneal=2, ema_decay=0.0, keep_checkpoints=0)
    metrics = train_and_save(cfg, tiny_split(tiny_data), Accelerator(cpu=True))
    assert (metrics["epochs_run"], metrics["stopped_early"], metrics["best_epoch"]) == (5, True, 4)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    per_epoch, left = divmod(len(history["iterations"]["step"]), 5)
    assert left == 0
    anneal = {"step": 3 * per_epoch, "epoch": 3, "epochs": 2}
    lrs = history["epochs"]["lr_backbone"]
    for epoch in (3, 4, 5):  # each epoch's figure is the lr of its last step
        last = epoch * per_epoch - 1
        assert lrs[epoch - 1] == pytest.approx(cfg.lr_finetune * lr_factor(last, per_epoch, cfg, anneal=anneal))
    # the last annealed step is a step from the floor; the full schedule would still be near half the base lr
    assert lrs[4] < 0.07 * cfg.lr_finetune and lr_factor(5 * per_epoch - 1, per_epoch, cfg) > 0.4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "after 1 epochs without a better validation mAP and 2 more (or the epochs left) that annealed" in card
