"""Streaming shards (attrclf.shards, attrclf.streaming), several machines on loopback, and --report-to tensorboard."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.numpy import load_file

from attrclf.config import TrainConfig
from attrclf.errors import AttrclfError
from attrclf.losses import build_loss
from attrclf.shards import read_shard, resolve_shards, write_shards
from attrclf.streaming import prepare_stream, stream_loader
from attrclf.transforms import eval_transform

from .conftest import OUTPUT_FILES, REPO, free_port, write_labels_dataset
from .test_scale import environment, run

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]
TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--no-pretrained", "--cpu-threads", "1"]


def label_line(n: int) -> str:
    return f"i{n:03d}.png {n % 2} {(n // 2) % 2} {'NA' if n % 5 == 0 else int(n % 3 == 0)} g{n // 3}"


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory):
    """200 images (attribute c NA in every 5th) as 20 tar shards of 10 rows, and the same as 20 Parquet shards."""
    root = tmp_path_factory.mktemp("stream")
    data = write_labels_dataset(root / "data", ["img a b c grp"] + [label_line(n) for n in range(200)])
    write_shards(str(data), root / "tar", shard_size=10, kind="tar", group_column="grp")
    write_shards(str(data), root / "parquet", shard_size=10, kind="parquet", group_column="grp")
    return root


def stream_config(shards, **changes) -> TrainConfig:
    settings = {"data": str(shards), "max_steps": 4, "eval_every": 2, "val_rows": 30, "stats_rows": 50,
                "batch_size": 8, "num_workers": 0, "backbone": "test_resnet", "pretrained": False, "image_size": 32,
                "shuffle_buffer": 16, **changes}
    return TrainConfig(**settings).resolve()


class OneProcess:
    process_index, num_processes, device = 0, 1, torch.device("cpu")


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_shards_hold_every_row_with_its_labels_and_image_bytes(shard_data, kind):
    """`attrclf shard` wrote 20 shards; reading them back gives each labels.txt row's labels (NA as None), group
    and the image file's exact bytes, in order."""
    urls = resolve_shards(str(shard_data / kind))
    assert [u.rsplit("/", 1)[-1] for u in urls] == [f"shard-{i:05d}.{kind}" for i in range(20)]
    rows = [row for url in urls for row in read_shard(url)]
    assert len(rows) == 200
    for n in (0, 3, 5, 199):
        expected = dict(zip("abc", [int(v) if v != "NA" else None for v in label_line(n).split()[1:4]], strict=True))
        assert {k: rows[n].labels[k] for k in "abc"} == expected
        assert rows[n].group == f"g{n // 3}"
        assert rows[n].image == (shard_data / "data" / "images" / f"i{n:03d}.png").read_bytes()


def test_validation_rows_are_held_out_of_training_and_counted_for_pos_weight(shard_data):
    """The first 30 rows (shards 0-2) validate and never reach the training stream; one pass of the stream has
    every other row once; the stats sample is the first training rows."""
    data = prepare_stream(stream_config(shard_data / "tar", shuffle_buffer=1))
    assert list(data.validation["image_name"]) == [f"shard-{n // 10:05d}.tar/i{n:03d}" for n in range(30)]
    assert list(data.train["image_name"]) == [f"shard-{n // 10:05d}.tar/i{n:03d}" for n in range(30, 80)]
    loader = stream_loader(data, None, stream_config(shard_data / "tar"), OneProcess())
    names = []
    for passes, row in loader.rows():
        if passes:
            break
        names.append(row["image_name"])
    assert sorted(names) == [f"shard-{n // 10:05d}.tar/i{n:03d}" for n in range(30, 200)]


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_a_streamed_na_entry_adds_no_loss(shard_data, kind):
    """Batches from the stream mask exactly the NA entries, and whatever the targets say there, the loss is the same:
    equal to BCE over the known entries computed by hand."""
    cfg = stream_config(shard_data / kind)
    data = prepare_stream(cfg)
    config = __import__("attrclf").AttrConfig.for_backbone("test_resnet", ["a", "b", "c"], image_size=32)
    loader = stream_loader(data, eval_transform(config), cfg, OneProcess())
    pixel_values, targets, mask = next(iter(loader))
    loader.close()
    assert pixel_values.shape == (8, 3, 32, 32)
    by_name = {f"i{n:03d}": label_line(n).split()[1:4] for n in range(200)}
    assert mask.sum() < mask.numel()  # the first batches hold NA entries (every 5th image's c)
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    loss_fn = build_loss("bce", torch.ones(3))
    flipped = torch.where(mask, targets, 1 - targets)
    assert torch.allclose(loss_fn(logits, targets, mask), loss_fn(logits, flipped, mask))
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask])
    assert torch.allclose(loss_fn(logits, targets, mask), manual, atol=1e-6)
    assert all(v in ("0", "1", "NA") for values in by_name.values() for v in values)


def test_closing_the_loader_closes_the_datasets_iterator_at_once(shard_data):
    """close() (and leaving rows() early) finishes the datasets iterator then and there, not when the garbage
    collector gets to it: its finaliser joins a thread pool, which deadlocked a test when GC ran it inside another
    thread's start."""
    cfg = stream_config(shard_data / "tar")
    config = __import__("attrclf").AttrConfig.for_backbone("test_resnet", ["a", "b", "c"], image_size=32)
    loader = stream_loader(prepare_stream(cfg), eval_transform(config), cfg, OneProcess())
    next(iter(loader))
    rows = loader._rows
    assert rows.gi_frame is not None  # suspended mid-pass
    loader.close()
    assert rows.gi_frame is None and loader._rows is None
    for _ in loader.rows():
        rows = loader._rows
        break
    assert rows.gi_frame is None and loader._rows is None
    assert len(next(iter(loader))[0]) == 8  # a closed loader starts again where its state says
    loader.close()


def test_a_bad_row_is_named_by_shard_and_row(shard_data, tmp_path):
    """A label 'x' in shard 5, row 3 stops the stream with one line naming the shard, row and key."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for url in resolve_shards(str(shard_data / "tar")):
        with tarfile.open(url) as source, tarfile.open(bad / url.rsplit("/", 1)[-1], "w") as target:
            for member in source.getmembers():
                payload = source.extractfile(member).read()
                if member.name == "i053.json":
                    payload = payload.replace(b'"b": 0', b'"b": "x"')
                member.size = len(payload)
                target.addfile(member, __import__("io").BytesIO(payload))
    cfg = stream_config(bad, shuffle_buffer=1, stats_rows=10, eval_every=10)
    config = __import__("attrclf").AttrConfig.for_backbone("test_resnet", ["a", "b", "c"], image_size=32)
    loader = stream_loader(prepare_stream(cfg), eval_transform(config), cfg, OneProcess())
    with pytest.raises(AttrclfError, match=r"^shard-00005\.tar row 3 \(key i053\): value 'x' for attribute 'b' is "
                                           r"not 0, 1 or NA$"):
        for _ in loader:  # training row 24 in order (rows 0-29 validate): the third batch of 8
            pass
    loader.close()
    with pytest.raises(AttrclfError, match="shard-00005.tar row 3"):  # held out for validation: found up front
        prepare_stream(stream_config(bad, val_rows=60))


def test_streaming_needs_max_steps_and_report_to_names_the_missing_package(shard_data):
    with pytest.raises(AttrclfError, match="--max-steps"):
        TrainConfig(data=str(shard_data / "tar")).resolve()
    with pytest.raises(AttrclfError, match="cannot be combined with a stream"):
        stream_config(shard_data / "tar", balanced_sampler=True)
    for name in ("wandb", "mlflow"):
        if __import__("importlib").util.find_spec(name) is None:
            with pytest.raises(AttrclfError, match=f"^--report-to {name} needs {name}: pip install {name}$"):
                stream_config(shard_data / "tar", report_to=name)


# ---------------------------------------------------------------- real processes


@pytest.mark.slow
def test_two_gloo_processes_stream_every_training_row_once_per_pass(shard_data, tmp_path):
    """split_dataset_by_node gives each of 2 processes 9 of the 18 training shards: one pass over both sees every
    training row exactly once, and no validation row."""
    out = tmp_path / "pass.json"
    result = run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  str(REPO / "tests" / "stream_check.py"), str(shard_data / "tar"), str(out)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    first, second = report["names"]
    assert report["world_size"] == 2 and report["train_shards"] == 18
    assert not set(first) & set(second) and len(first) + len(second) == 170
    assert sorted(first + second) == [f"shard-{n // 10:05d}.tar/i{n:03d}" for n in range(30, 200)]
    assert not set(report["validation"]) & set(first + second)


@pytest.mark.slow
def test_streaming_run_on_two_processes_resumes_like_an_uninterrupted_one_and_logs_to_tensorboard(shard_data,
                                                                                                   tmp_path):
    """train.py on 20 tar shards, 2 gloo processes, 3 rounds of 3 steps: killed after the first checkpoint and
    resumed (at each process's shard + row offset), it matches a run never interrupted; the uninterrupted run's
    TensorBoard scalars equal its history.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*TINY, "--data", str(shard_data / "tar"), "--max-steps", "9", "--eval-every", "3", "--val-rows", "30",
            "--stats-rows", "50", "--shuffle-buffer", "1", "--num-workers", "1", "--ema-decay", "0"]
    launch = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = run([*launch, str(free_port()), str(REPO / "train.py"), *args, "--output-dir", str(whole),
                  "--report-to", "tensorboard"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in whole.iterdir()) == sorted([*OUTPUT_FILES, "tracking"])
    history = json.loads((whole / "history.json").read_text())
    events = EventAccumulator(str(next((whole / "tracking").iterdir())))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in steps] == history["iterations"]["step"] == list(range(1, 10))
    np.testing.assert_allclose([v for _, v in steps], history["iterations"]["loss"], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in events.Scalars("val/mAP")], history["epochs"]["val_mAP"], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in events.Scalars("val/loss")], history["epochs"]["val_loss"], rtol=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6, 9]
    assert {"val/AP/a", "val/AP/b", "val/AP/c", "train/lr_head"} <= set(events.Tags()["scalars"])

    process = subprocess.Popen([*launch, str(free_port()), str(REPO / "train.py"), *args, "--output-dir", str(broken)],
                               env=environment(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    first = broken / "checkpoints" / "epoch_0001" / "training_state.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    family = psutil.Process(process.pid).children(recursive=True)  # torchrun starts the ranks in their own sessions
    os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        child.kill()
    process.wait()
    psutil.wait_procs(family, timeout=30)
    assert not (broken / "metrics.json").exists()
    saved = json.loads(first.read_text())["stream"]
    assert len(saved) == 2 and all(s["batches"] == 3 for s in saved)  # each process: 3 batches trained on
    result = run([*launch, str(free_port()), str(REPO / "train.py"), *args, "--output-dir", str(broken), "--resume"],
                 tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = json.loads((broken / "history.json").read_text())
    np.testing.assert_allclose(resumed["iterations"]["loss"], history["iterations"]["loss"], atol=1e-6)
    wa, wb = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5
    metrics = json.loads((broken / "metrics.json").read_text())
    assert metrics["data"]["streaming"]["train_shards"] == 18 and metrics["data"]["train_images"] == 9 * 8 * 2


@pytest.mark.slow
def test_two_machines_on_loopback_write_one_output_set_and_evaluate_like_one_process(tmp_path, tiny_data,
                                                                                       saved_model):
    """Two `accelerate launch` calls, --machine_rank 0 and 1 (one gloo process each, 127.0.0.1): only global rank 0
    writes (one output set, one 'saved to'), metrics.json says world size 2 on 2 machines, and a fixed model's
    validation over the two machines equals one process's."""
    from .test_scale import evaluate_in_this_process

    def machines(script_args):
        port = str(free_port())
        commands = [[*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                     "--main_process_ip", "127.0.0.1", "--main_process_port", port, *script_args] for rank in (0, 1)]
        processes = [subprocess.Popen(c, env=environment(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for c in commands]
        outputs = [p.communicate(timeout=600) for p in processes]
        for p, (stdout, stderr) in zip(processes, outputs, strict=True):
            assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
        return [stdout for stdout, _ in outputs]

    out = tmp_path / "out"
    logs = machines([str(REPO / "train.py"), *TINY, "--data", str(tiny_data), "--group-column", "grp",
                     "--val-fraction", "0.25", "--epochs", "2", "--num-workers", "0", "--output-dir", str(out)])
    assert [log.count("saved to") for log in logs] == [1, 0]
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["num_machines"]) == (2, 2)
    assert json.loads((out / "history.json").read_text())["iterations"]["epoch"] == [1, 1, 1, 2, 2, 2]

    model_dir, _ = saved_model
    checks = tmp_path / "checks"
    checks.mkdir()
    machines([str(REPO / "tests" / "multiprocess_check.py"), str(model_dir), str(tiny_data), str(checks)])
    two = json.loads((checks / "report.json").read_text())
    assert two["world_size"] == 2
    one = evaluate_in_this_process(model_dir, tiny_data)
    assert two["evaluation"]["mask"] == one["mask"]  # every validation image once, in order
    np.testing.assert_allclose(two["evaluation"]["probs"], one["probs"], atol=1e-5)
    assert abs(two["evaluation"]["mAP"] - one["mAP"]) < 1e-6 and abs(two["evaluation"]["loss"] - one["loss"]) < 1e-6
