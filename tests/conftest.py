"""Shared fixtures. Everything runs offline on CPU; the Hub clients are told so before they are imported."""

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Predictor's "auto" backend times the backends at load; tests pin fp32 torch so that every answer is exact and the
# same on every CPU (tests/test_backends.py unsets it to test auto itself)
os.environ.setdefault("ATTRCLF_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Keep generated demo data and any Hub cache out of the user's home."""
    monkeypatch.setenv("ATTRCLF_CACHE", str(tmp_path_factory.getbasetemp() / "attrclf-cache"))


def write_image(path: Path, colour=(200, 30, 30), size=(24, 24), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def write_labels_dataset(root: Path, lines: list[str], images: list[str] | None = None) -> Path:
    """root/labels.txt with `lines`, and a small image in root/images/ for each name (default: every line's first)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    if images is None:
        images = [line.split()[0] for line in lines if line.strip() and line.split()[0].lower().endswith(".png")]
    rng = np.random.default_rng(0)
    for name in images:
        write_image(root / "images" / name, tuple(int(v) for v in rng.integers(0, 255, 3)))
    return root


@pytest.fixture
def labels_factory(tmp_path):
    def make(lines, images=None, name="data"):
        return write_labels_dataset(tmp_path / name, lines, images)

    return make


@pytest.fixture(scope="session")
def tiny_model_factory():
    """AttrClassifier on timm's tiny test_resnet at 32 px (random weights, no download)."""
    from attrclf import AttrClassifier, AttrConfig

    def make(label_names=("a", "b", "c"), head_hidden=16, seed=0, image_size=32):
        torch.manual_seed(seed)
        config = AttrConfig.for_backbone("test_resnet", list(label_names), image_size=image_size,
                                         head_hidden=head_hidden)
        return AttrClassifier(config)

    return make


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tiny_model_factory):
    """A tiny model saved like training saves it, with distinct thresholds."""
    model = tiny_model_factory(("red", "round", "big"))
    model.config.thresholds = [0.3, 0.5, 0.7]
    folder = tmp_path_factory.mktemp("saved_model")
    model.eval()
    model.save_pretrained(folder)
    return folder, model


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server or a rendezvous a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_of(call) -> str:
    """The message of the AttrclfError that `call()` raises (the test fails if it raises none)."""
    from attrclf.errors import AttrclfError

    with pytest.raises(AttrclfError) as info:
        call()
    return str(info.value)


# ------------------------------------------------ training on a tiny labelled set (engine, checkpoints, ...)

OUTPUT_FILES = ["README.md", "config.json", "history.json", "loss_curve.png", "metrics.json", "model.safetensors",
                "pr_curves.png", "train_config.json"]  # a training run's output folder, exactly


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """72 images in 24 groups of 3; attributes a, b, c (c has NA). 54 train / 18 validation with --val-fraction 0.25."""
    lines = ["img a b c grp"] + [f"i{n:02d}.png {n % 2} {(n // 2) % 2} {'NA' if n % 5 == 0 else int(n % 3 == 0)} "
                                 f"g{n // 3}" for n in range(72)]
    return write_labels_dataset(tmp_path_factory.mktemp("scale") / "data", lines)


def tiny_config(tiny_data, output_dir, **changes):
    """A resolved TrainConfig for `tiny_data` on test_resnet at 32 px, 2 epochs, in this process."""
    from attrclf.config import TrainConfig

    settings = {"data": str(tiny_data), "group_column": "grp", "val_fraction": 0.25, "backbone": "test_resnet",
                "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 2, "num_workers": 0,
                "output_dir": str(output_dir), **changes}
    return TrainConfig(**settings).resolve()


def tiny_split(tiny_data, **changes):
    """`tiny_data` loaded and split as tiny_config's runs see it."""
    from attrclf.sources import prepare_data

    return prepare_data(tiny_data, **{"group_column": "grp", "val_fraction": 0.25, "seed": 42, **changes})
