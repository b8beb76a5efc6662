"""Training at scale and under faults, in real processes: two gloo ranks, bf16 autocast, SIGKILL and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from accelerate import Accelerator
from safetensors.numpy import load_file

from .conftest import OUTPUT_FILES, REPO, tiny_split

pytestmark = pytest.mark.slow  # every test here trains in subprocesses

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--no-pretrained", "--cpu-threads", "1",
        "--group-column", "grp", "--val-fraction", "0.25"]


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
    data = tiny_split(tiny_data)
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
    return evaluate_saved_model(str(model_dir), tiny_split(data_dir), Accelerator(), batch_size=4,
                                pos_weight=pos_weight)


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
