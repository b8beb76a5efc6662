"""End to end: the real `accelerate launch train.py`, and train.py's bad-input errors."""

import json
import os
import subprocess
import sys

import pytest

import attrclf
from attrclf.config import TrainConfig, parse_args

from .conftest import REPO, write_labels_dataset

pytestmark = pytest.mark.slow  # every test here runs train.py in a subprocess

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]


def run_train(args, tmp_path, launcher=("python",)):
    env = {**os.environ, "ATTRCLF_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch"] if launcher == ("accelerate",) else [sys.executable]
    return subprocess.run([*command, str(REPO / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def test_accelerate_launch_trains_the_demo_end_to_end(tmp_path):
    out = tmp_path / "outputs"
    result = run_train([*TINY, "--demo-size", "240", "--epochs", "4", "--lr", "3e-3", "--output-dir", str(out),
                        "--hidden-dropout", "0.2"], tmp_path, launcher=("accelerate",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embedded demo dataset" in result.stdout
    assert "warning: --hidden-dropout 0.2 is unused" in result.stdout  # the default head has no hidden layer
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "history.json", "loss_curve.png", "metrics.json", "model.safetensors",
        "pr_curves.png", "train_config.json",
    ]
    history = json.loads((out / "history.json").read_text())
    losses = history["epochs"]["train_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert len(history["iterations"]["loss"]) == 4 * (192 // 16)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["train_images"] == 192 and metrics["data"]["validation_images"] == 48
    assert set(metrics["validation"]["per_attribute"]) == {"outlined", "red", "striped", "large", "dark_background",
                                                           "dot"}
    assert 0 <= metrics["validation"]["mAP"] <= 1
    config = json.loads((out / "config.json").read_text())
    per_attribute = metrics["validation"]["per_attribute"]
    assert config["thresholds"] == [per_attribute[n]["threshold"] for n in config["label_names"]]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val_mAP" in result.stdout and "mAP" in result.stdout
    assert metrics["attrclf_version"] == attrclf.__version__
    saved = json.loads((out / "train_config.json").read_text())  # --config repeats the run: the same settings
    assert parse_args(["--config", str(out / "train_config.json")]) == TrainConfig(**saved)

    predicted = subprocess.run([sys.executable, "-m", "attrclf.predict", "--model", str(out),
                                str(tmp_path / "cache"), "--format", "json"], capture_output=True, text=True, cwd=REPO)
    # the cache folder holds no image at its top level: a clear error, not a crash
    assert predicted.returncode == 2 and "no images found" in predicted.stderr


@pytest.fixture
def bad_dataset(tmp_path):
    return write_labels_dataset(tmp_path / "bad", ["img a b", "x.png 1 0", "y.png 1 maybe"])


def test_bad_input_is_one_clear_line_and_leaves_outputs_alone(tmp_path, bad_dataset):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous model")
    result = run_train(["--data", str(bad_dataset), "--no-pretrained", "--output-dir", str(out)], tmp_path)
    assert result.returncode == 2
    assert "labels.txt line 3: value 'maybe' for attribute 'b' is not 0, 1 or NA" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous model"


def test_pretrained_download_failure_says_what_to_do(tmp_path):
    data = write_labels_dataset(tmp_path / "d", [f"i{n}.png {n % 2} 1" for n in range(10)])
    result = run_train(["--data", str(data), *TINY, "--output-dir", str(tmp_path / "o")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--backbone-weights" in result.stderr and "--no-pretrained" in result.stderr


def test_training_on_a_labels_folder_with_unreadable_images(tmp_path):
    lines = ["img left right"] + [f"i{n:02d}.png {n % 2} {1 - n % 2}" for n in range(40)] + ["bad.png 1 0"]
    data = write_labels_dataset(tmp_path / "d", lines)
    (data / "images" / "bad.png").write_bytes(b"")
    out = tmp_path / "o"
    result = run_train(["--data", str(data), "--no-pretrained", *TINY, "--epochs", "1", "--output-dir", str(out)],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["skipped_images"] == 1 and metrics["data"]["skipped"][0]["image"] == "bad.png"
    assert "1 unreadable image(s) skipped" in result.stdout
