"""Training at scale and under faults: several processes, bf16, checkpoints and resume, k-fold CV, bad images."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.numpy import load_file

from attrclf.data import make_folds, prepare_data
from attrclf.engine import (
    TrainConfig,
    build_model,
    cross_validate,
    evaluate,
    finalize,
    fit,
    list_checkpoints,
    parse_args,
    read_checkpoint,
    resume_point,
)
from attrclf.errors import AttrclfError

from .conftest import REPO, write_labels_dataset

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--no-pretrained", "--cpu-threads", "1",
        "--group-column", "grp", "--val-fraction", "0.25"]
OUTPUT_FILES = ["README.md", "config.json", "history.json", "loss_curve.png", "metrics.json", "model.safetensors",
                "pr_curves.png", "train_config.json"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """72 images in 24 groups of 3; attributes a, b, c (c has NA). 54 train / 18 validation with --val-fraction 0.25."""
    lines = ["img a b c grp"] + [f"i{n:02d}.png {n % 2} {(n // 2) % 2} {'NA' if n % 5 == 0 else int(n % 3 == 0)} "
                                 f"g{n // 3}" for n in range(72)]
    return write_labels_dataset(tmp_path_factory.mktemp("scale") / "data", lines)


def tiny_config(tiny_data, output_dir, **changes) -> TrainConfig:
    settings = {"data": str(tiny_data), "group_column": "grp", "val_fraction": 0.25, "backbone": "test_resnet",
                "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 2, "num_workers": 0,
                "output_dir": str(output_dir), **changes}
    return TrainConfig(**settings).resolve()


def train_command(args, tmp_path, processes=None, mixed_precision=None):
    if processes is None and mixed_precision is None:
        return [sys.executable, str(REPO / "train.py"), *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
              "--mixed_precision", mixed_precision or "no"]
    launch += ["--multi_gpu", "--num_processes", str(processes)] if processes else ["--num_processes", "1"]
    return [*launch, str(REPO / "train.py"), *args]


def environment(tmp_path) -> dict:
    return {**os.environ, "ATTRCLF_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1",
            "PYTHONPATH": str(REPO)}


def run(command, tmp_path):
    return subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path), cwd=tmp_path,
                          timeout=600, check=False)


# ---------------------------------------------------------------- several processes


def test_two_gloo_processes_train_once_and_evaluate_like_one(tmp_path, tiny_data, saved_model):
    """train.py on 2 ranks: world size 2, half the steps per rank, one set of outputs; a fixed model's evaluation
    gathers every validation image once, in order, with the metrics of one process; the backbone unfrozen in stage 2
    stays identical on both ranks."""
    out = tmp_path / "out"
    result = run(train_command([*TINY, "--data", str(tiny_data), "--epochs", "2", "--head-epochs", "1",
                                "--unfreeze-stages", "all", "--num-workers", "0", "--output-dir", str(out)],
                               tmp_path, processes=2), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout and result.stdout.count("saved to") == 1
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES  # one set, no checkpoints or temporary files left
    history = json.loads((out / "history.json").read_text())
    assert history["iterations"]["epoch"] == [1, 1, 1, 2, 2, 2]  # 54 train images // 8 = 6 batches, 3 per rank
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2

    model_dir, _ = saved_model
    checks = tmp_path / "checks"
    checks.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "tests" / "multiprocess_check.py"), str(model_dir), str(tiny_data), str(checks)]
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((checks / "report.json").read_text())
    assert report["world_size"] == 2 and report["validation_images"] == 18  # 18 = 2 x 4 x 2 + 2: a ragged last batch
    training = report["training"]
    assert training["steps"] == 6 and training["backbone_max_change"] > 0
    assert training["backbone_max_difference_between_processes"] == 0.0

    one = evaluate_in_this_process(model_dir, tiny_data)
    two = report["evaluation"]
    data = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=42)
    expected_mask = [[v is not None for v in row] for row in data.validation["labels"]]
    assert two["mask"] == expected_mask and one["mask"] == expected_mask  # every image once, in dataset order
    np.testing.assert_allclose(two["probs"], one["probs"], atol=1e-5)
    assert abs(two["mAP"] - one["mAP"]) < 1e-6 and abs(two["loss"] - one["loss"]) < 1e-6


def evaluate_in_this_process(model_dir, data_dir, pos_weight=None) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from multiprocess_check import evaluate_saved_model
    finally:
        sys.path.remove(str(REPO / "tests"))
    data = prepare_data(data_dir, group_column="grp", val_fraction=0.25, seed=42)
    return evaluate_saved_model(str(model_dir), data, Accelerator(), batch_size=4, pos_weight=pos_weight)


# ---------------------------------------------------------------- mixed precision


def test_bf16_training_on_cpu_reports_the_fp32_validation_loss(tmp_path, tiny_data):
    """accelerate's --mixed_precision bf16 runs on CPU (a tiny model: bf16 is slow on CPUs without bf16 units); the
    validation loss it measured under bf16 autocast is within bf16 rounding of the saved model's fp32 loss."""
    out = tmp_path / "out"
    result = run(train_command([*TINY, "--data", str(tiny_data), "--epochs", "1", "--max-steps", "3", "--num-workers",
                                "0", "--output-dir", str(out)], tmp_path, mixed_precision="bf16"), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixed_precision"] == "bf16"
    assert np.isfinite(json.loads((out / "history.json").read_text())["iterations"]["loss"]).all()
    fp32 = evaluate_in_this_process(out, tiny_data, pos_weight=list(metrics["pos_weight"].values()))
    assert abs(metrics["validation"]["loss"] - fp32["loss"]) < 0.02 * fp32["loss"]


# ---------------------------------------------------------------- checkpoints and resume


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_data):
    """SIGKILL a real run mid-epoch after checkpoint 1, resume it: same history, metrics and weights as a run that
    was never interrupted. A worker process (the default) is used, so its seeds must carry over too."""
    args = [*TINY, "--data", str(tiny_data), "--epochs", "3", "--head-epochs", "1", "--unfreeze-stages", "all",
            "--num-workers", "1"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = run(train_command([*args, "--output-dir", str(whole)], tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    process = subprocess.Popen(train_command([*args, "--output-dir", str(broken)], tmp_path), env=environment(tmp_path),
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = broken / "checkpoints" / "epoch_0001" / "training_state.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (broken / "metrics.json").exists()  # killed before the end
    (broken / "checkpoints" / ".tmp-epoch_0007").mkdir()  # as a kill during a checkpoint write leaves it
    (broken / "checkpoints" / ".tmp-epoch_0007" / "model.safetensors").write_bytes(b"half a file")

    result = run(train_command([*args, "--output-dir", str(broken), "--resume"], tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert sorted(p.name for p in broken.iterdir()) == OUTPUT_FILES  # checkpoints removed once the run completed
    a, b = (json.loads((d / "history.json").read_text()) for d in (whole, broken))
    assert len(a["iterations"]["loss"]) == len(b["iterations"]["loss"]) == 3 * 6
    np.testing.assert_allclose(b["iterations"]["loss"], a["iterations"]["loss"], atol=1e-6)
    assert b["epochs"]["stage"] == a["epochs"]["stage"] == ["head", "finetune", "finetune"]
    assert b["epochs"]["lr_head"] == pytest.approx(a["epochs"]["lr_head"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, broken))
    assert mb["best_epoch"] == ma["best_epoch"] and mb["epochs_run"] == ma["epochs_run"] == 3
    for name in ("loss", "mAP", "f1_macro_at_0.5", "f1_macro_tuned"):
        assert abs(mb["validation"][name] - ma["validation"][name]) < 1e-4, name
    wa, wb = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5


def test_checkpoints_keep_the_last_k_and_refuse_other_data(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path / "out", epochs=3, keep_checkpoints=2)
    data = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=42)
    accelerator = Accelerator()
    result = fit(build_model(cfg, data.label_names), data, cfg, accelerator)
    kept = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [p.name for p in kept] == ["epoch_0002", "epoch_0003"]

    resumed = fit(build_model(cfg, data.label_names), data, cfg, accelerator, resume_from=kept[-1])
    assert resumed.history == result.history and resumed.best_epoch == result.best_epoch  # nothing left to train
    assert all(torch.equal(resumed.best_state[k], v) for k, v in result.best_state.items())

    fewer = prepare_data(tiny_data, label_columns=["a", "b"], group_column="grp", val_fraction=0.25, seed=42)
    with pytest.raises(AttrclfError, match="trained on other data"):
        read_checkpoint(kept[-1], data_fingerprint_of(fewer), cfg, accelerator)
    other_split = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=7)
    with pytest.raises(AttrclfError, match="trained on other data"):
        read_checkpoint(kept[-1], data_fingerprint_of(other_split), cfg, accelerator)
    with pytest.raises(AttrclfError, match="batch-size 8"):
        read_checkpoint(kept[-1], data_fingerprint_of(data), tiny_config(tiny_data, tmp_path, batch_size=4), accelerator)


def data_fingerprint_of(data):
    from attrclf.data import data_fingerprint

    return data_fingerprint(data)


def test_resume_flags_and_a_fresh_run_never_overwrites_an_interrupted_one(tmp_path, tiny_data):
    assert parse_args(["--resume"]).resume == "latest" and parse_args(["--resume", "ck/epoch_0002"]).resume == "ck/epoch_0002"
    assert parse_args([]).resume is None and parse_args([]).keep_checkpoints == 2
    with pytest.raises(AttrclfError, match="no checkpoint in"):
        resume_point(tiny_config(tiny_data, tmp_path / "out", resume="latest"))
    checkpoint = tmp_path / "out" / "checkpoints" / "epoch_0001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    (tmp_path / "out" / "checkpoints" / ".tmp-epoch_0002").mkdir()  # an unfinished write is not a checkpoint
    with pytest.raises(AttrclfError, match=r"interrupted run \(latest: epoch_0001\): pass --resume"):
        resume_point(tiny_config(tiny_data, tmp_path / "out"))
    assert resume_point(tiny_config(tiny_data, tmp_path / "out", resume="latest")) == checkpoint
    assert (checkpoint / "training_state.json").read_text() == "{}"


# ---------------------------------------------------------------- k-fold cross-validation


def test_folds_partition_the_images_and_keep_groups_together(tiny_data):
    data = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=42)
    folds = make_folds(data, 5, seed=1)
    validation_sets = [set(f.validation["image_name"]) for f in folds]
    everything = set(data.train["image_name"]) | set(data.validation["image_name"])
    assert sum(len(s) for s in validation_sets) == len(everything) == 72
    assert set().union(*validation_sets) == everything
    assert sorted(len(s) for s in validation_sets) == [12, 15, 15, 15, 15]  # 24 groups of 3 over 5 folds
    for fold, names in zip(folds, validation_sets):
        assert set(fold.train["image_name"]) == everything - names
        assert not set(fold.train["group"]) & set(fold.validation["group"])
    assert [set(f.validation["image_name"]) for f in make_folds(data, 5, seed=1)] == validation_sets
    with pytest.raises(AttrclfError, match="at most one per group"):
        make_folds(data, 25, seed=1)


def test_cross_validation_writes_k_models_and_the_summary_of_their_figures(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path / "cv", epochs=1, folds=2)
    data = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=42)
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


# ---------------------------------------------------------------- images that break during training


def test_images_that_break_after_the_check_are_counted_and_training_goes_on(tmp_path, tiny_data):
    data_dir = tmp_path / "data"
    lines = (tiny_data / "labels.txt").read_text().splitlines()
    write_labels_dataset(data_dir, lines)
    data = prepare_data(data_dir, group_column="grp", val_fraction=0.25, seed=42)
    broken_train, broken_val = data.train["image_name"][3], data.validation["image_name"][5]
    for name in (broken_train, broken_val):  # after the pre-check, before training: a disk or sync fault
        (data_dir / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = tiny_config(data_dir, tmp_path / "out", epochs=2, batch_size=9, keep_checkpoints=0)  # 54 = 6 x 9: no image left out
    model = build_model(cfg, data.label_names)
    result = fit(model, data, cfg, Accelerator())
    assert result.history["epochs"]["bad_images"] == [2, 2]
    assert result.decode_failures == {broken_train: 2, broken_val: 2}
    assert len(result.history["iterations"]["loss"]) == 2 * 6  # training went on
    assert result.val_mask.shape == (18, 3) and not result.val_mask[5].any()  # kept in place, all NA
    metrics = finalize(model, result, data, cfg)
    assert metrics["data"]["decode_failures"] == 4
    assert metrics["data"]["decode_failed_images"] == {broken_train: 2, broken_val: 2}


def test_evaluate_counts_each_validation_image_once_in_one_process(tmp_path, tiny_data, tiny_model_factory):
    """18 validation images in batches of 4: the ragged last batch is neither dropped nor padded."""
    data = prepare_data(tiny_data, group_column="grp", val_fraction=0.25, seed=42)
    model = tiny_model_factory(tuple(data.label_names))
    from attrclf.data import eval_transform, make_loader
    from attrclf.losses import build_loss

    accelerator = Accelerator()
    loader = make_loader(data.validation, eval_transform(model.config), 4, shuffle=False)
    prepared, loader = accelerator.prepare(model, loader)
    _, probs, targets, _ = evaluate(prepared, loader, build_loss("bce"), accelerator)
    accelerator.free_memory()
    assert probs.shape == (18, 3)
    assert targets.tolist() == [[float(v or 0) for v in row] for row in data.validation["labels"]]
