"""attrclf.loader: batches of (pixel_values, targets, mask), decode failures, and the balanced sampler."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset

from attrclf.errors import AttrclfError
from attrclf.loader import BatchTransform, DecodeFailures, balanced_sample_weights, collate, make_loader
from attrclf.sources import load_source

from .conftest import REPO


def test_collate_builds_targets_and_mask():
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "labels": [1, None, 0]},
        {"pixel_values": None, "labels": [1, 1, 1]},  # failed to decode: dropped
        {"pixel_values": torch.ones(3, 4, 4), "labels": [None, 0, 1]},
    ]
    pixel_values, targets, mask = collate(items)
    assert pixel_values.shape == (2, 3, 4, 4)
    assert targets.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert mask.tolist() == [[True, False, True], [False, True, True]]


def test_collate_keeps_a_failed_image_as_a_blank_with_every_label_na():
    items = [{"pixel_values": torch.ones(3, 2, 2), "labels": [1, 0]}, {"pixel_values": None, "labels": [1, 1]}]
    pixel_values, targets, mask = collate(items, keep_failed=True)
    assert pixel_values.shape == (2, 3, 2, 2) and pixel_values[1].abs().sum() == 0
    assert targets.tolist() == [[1, 0], [0, 0]] and mask.tolist() == [[True, True], [False, False]]
    with pytest.raises(AttrclfError, match="every image in a batch failed"):
        collate([{"pixel_values": None, "labels": [1]}])
    with pytest.raises(TypeError):
        collate(items, True)  # flags by name


def test_decode_failures_are_counted_once_per_take():
    failures = DecodeFailures(["a", "b", "c"])
    failures.add("c")
    failures.add("a")
    failures.add("c")
    assert failures.take() == ["a", "c"]
    assert failures.take() == []


def test_batch_transform_marks_images_that_fail_to_decode(labels_factory):
    root = labels_factory(["img x", "good.png 1", "bad.png 0"], images=["good.png"])
    (root / "images" / "bad.png").write_bytes(b"broken")
    ds = load_source(root).splits["train"]
    failures = DecodeFailures(ds["image_name"])
    batch = BatchTransform(lambda image: torch.tensor(image.size), failures)(ds[:2])
    assert batch["pixel_values"][0].tolist() == [24, 24] and batch["pixel_values"][1] is None
    assert batch["labels"] == [[1], [0]] and failures.take() == ["bad.png"]
    loader = make_loader(ds, lambda image: torch.zeros(3, 2, 2), 2, False, failures=failures)
    pixel_values, _, mask = next(iter(loader))  # evaluation keeps the batch at its size
    assert pixel_values.shape == (2, 3, 2, 2) and mask.tolist() == [[True], [False]]
    with pytest.raises(TypeError):
        make_loader(ds, None, 2, False, 0)  # num_workers, seed, ... by name


# ---------------------------------------------------------------- balanced sampler


def test_balanced_weights_come_from_the_rarest_known_positive():
    # attribute a: 1 positive of 4 known (weight 4); b: 2 of 3 known (1.5); NA never counts
    labels = [[1, 1], [0, 1], [0, None], [0, 0], [None, None]]
    assert balanced_sample_weights(labels, 2) == [4.0, 1.5, 1.0, 1.0, 1.0]
    assert balanced_sample_weights(labels, 2, cap=2.0) == [2.0, 1.5, 1.0, 1.0, 1.0]


def rare_dataset(n=100, rare=10):
    """n rows; the first `rare` are positive for a rare attribute (1 in 10), the rest have no positive."""
    labels = [[1, 0] if i < rare else [0, None] for i in range(n)]
    return Dataset.from_dict({"image": [None] * n, "labels": labels})


def test_balanced_sampler_draws_rare_positives_more_often():
    ds = rare_dataset()
    weights = balanced_sample_weights(ds["labels"], 2)
    assert weights[:10] == [10.0] * 10 and weights[10:] == [1.0] * 90
    loader = make_loader(ds, None, 10, True, seed=3, sample_weights=weights)
    draws = np.concatenate([list(loader.sampler) for _ in range(20)])  # 2000 draws
    # expected share of the rare images: 10 * 10 / (10 * 10 + 90 * 1) = 0.526 (binomial sd 0.011); shuffling: 0.1
    assert len(draws) == 2000 and 0.47 < np.mean(draws < 10) < 0.58
    again = make_loader(ds, None, 10, True, seed=3, sample_weights=weights)
    assert list(again.sampler) == list(draws[:100])  # seeded


def test_balanced_sampler_is_sharded_by_accelerate_without_overlap():
    ds = rare_dataset()
    weights = balanced_sample_weights(ds["labels"], 2)
    whole = list(make_loader(ds, None, 10, True, seed=5, sample_weights=weights).batch_sampler)
    ranks = [list(prepare_data_loader(make_loader(ds, None, 10, True, seed=5, sample_weights=weights),
                                      num_processes=2, process_index=rank).batch_sampler) for rank in (0, 1)]
    # each process gets every other batch of the same draw: together exactly the one-process epoch
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert [batch for pair in zip(*ranks, strict=True) for batch in pair] == whole


WORKER_SCRIPT = """
import os, subprocess, sys, time
import torch
from attrclf.preemption import leave_stop_signals_to_the_main_process

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 400

    def __getitem__(self, i):
        if sys.argv[1] == "fail" and i == 3:
            raise FileNotFoundError("an image that went away")
        time.sleep(0.01)
        return torch.zeros(2)

loader = torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=1,
                                     worker_init_fn=leave_stop_signals_to_the_main_process)
for n, batch in enumerate(loader):
    if n == 5 and sys.argv[1] == "signal":
        kill = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
        subprocess.run([sys.executable, "-c", kill])  # as a scheduler does: the whole group, from outside
print("done", n)
"""


@pytest.mark.parametrize("case", ["signal", "fail"])
def test_loader_workers_leave_group_signals_to_the_main_process_and_still_end(tmp_path, case):
    """SIGTERM to the process group: the worker is not killed (torch would print a "worker killed by signal"
    traceback), the main process decides (here: it ignores it and finishes the epoch). A worker error: the main
    process ends at once; a worker ignoring SIGTERM outright made multiprocessing's exit handler wait forever."""
    script = tmp_path / "workers.py"
    preamble = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if case == "signal" else ""
    script.write_text(preamble + WORKER_SCRIPT)
    result = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    if case == "signal":
        assert result.returncode == 0 and result.stdout.strip() == "done 199", result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    else:
        assert result.returncode == 1 and "FileNotFoundError: an image that went away" in result.stderr
