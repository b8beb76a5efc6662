"""attrclf.decodecache: cached pixels equal a fresh decode + resize, a changed image or labels file rebuilds the cache,
a second run reuses it without decoding, and training with the cache gives the same result as without."""

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf import images
from attrclf.decodecache import CachedRows, CacheLayout, DecodeCache
from attrclf.model import AttrConfig
from attrclf.sources import prepare_data
from attrclf.transforms import eval_transform
from tests.conftest import tiny_config, write_labels_dataset


def photo(path, size=(40, 28), seed=0):
    """A noisy RGB image (resampling differences would show), saved as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def dataset(tmp_path):
    lines = ["img a b"] + [f"p{n}.png {n % 2} {'NA' if n == 3 else 1 - n % 2}" for n in range(12)]
    root = write_labels_dataset(tmp_path / "data", lines, images=[])
    (root / "images").mkdir()
    for n in range(12):
        photo(root / "images" / f"p{n}.png", size=(40 + n, 28), seed=n)
    (root / "images" / "p7.png").write_bytes(b"not a png")  # unreadable: reported once, left out
    return root


def cache_for(tmp_path, logs, size=32, geometry="whole"):
    config = AttrConfig.for_backbone("test_resnet", ["a", "b"], image_size=size, geometry=geometry)
    return DecodeCache(tmp_path / "cache", CacheLayout.for_model(config), log=logs.append), config


def test_cached_pixels_equal_a_fresh_decode_and_resize(tmp_path, dataset):
    logs = []
    cache, config = cache_for(tmp_path, logs)
    data = prepare_data(dataset, decode_cache=cache)
    assert "built" in logs[0] and "MiB on disk" in logs[0]
    assert [s["image"] for s in data.skipped] == ["p7.png"] and data.skipped[0]["reason"] == "not an image PIL can read"
    for ds in (data.train, data.validation):
        for row in ds:
            fresh = images.load_image(row["image"]).resize((32, 32), Image.Resampling.BILINEAR)
            assert np.array_equal(data.decoded.pixels(row["cache_row"]), np.asarray(fresh))
            assert data.decoded.original_size(row["cache_row"]) == Image.open(row["image"]["path"]).size
    # the eval transform over cached rows equals timm's eval transform of the decoded file exactly ("whole": the
    # stored pixels are the ones its resize makes)
    row = data.validation[0]
    cached = CachedRows(data.decoded, eval_transform(config))({"cache_row": [row["cache_row"]], "labels": [[1, 0]]})
    assert torch.equal(cached["pixel_values"][0], eval_transform(config)(images.load_image(row["image"])))


def test_same_split_as_without_the_cache(tmp_path, dataset):
    with_cache = prepare_data(dataset, decode_cache=cache_for(tmp_path, [])[0])
    without = prepare_data(dataset)
    assert with_cache.train["image_name"] == without.train["image_name"]
    assert with_cache.validation["image_name"] == without.validation["image_name"]
    assert with_cache.skipped == without.skipped


def test_second_open_reuses_without_decoding(tmp_path, dataset, monkeypatch):
    logs = []
    prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    monkeypatch.setattr(images.Image, "open", no_decoding)
    data = prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    assert logs[1].startswith("decoded-image cache: reused")
    assert [s["image"] for s in data.skipped] == ["p7.png"]  # still reported, from the index


def test_two_runs_opening_one_cache_at_once_build_it_once(tmp_path, dataset, monkeypatch):
    """Two runs on one --cache-dir at the same moment (a seed sweep with --jobs 2): one builds under the folder's lock,
    the other waits and reuses it; before the lock, the second rebuild replaced the folder under the first run."""
    import threading

    from attrclf import decodecache

    slow = decodecache.decode_resized

    def slow_decode(*args):
        time.sleep(0.02)  # both runs are inside the build at once without the lock
        return slow(*args)

    monkeypatch.setattr(decodecache, "decode_resized", slow_decode)
    logs, results, start = [], [], threading.Barrier(2)

    def run():
        start.wait()
        results.append(prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0]))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(line.split()[2] for line in logs) == ["built", "reused"]
    for data in results:
        row = data.train[0]
        fresh = images.load_image(row["image"]).resize((32, 32), Image.Resampling.BILINEAR)
        assert np.array_equal(data.decoded.pixels(row["cache_row"]), np.asarray(fresh))


def test_a_changed_image_rebuilds_and_a_changed_label_reuses(tmp_path, dataset):
    logs = []
    first = prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    folder = first.decoded.folder
    target = dataset / "images" / "p2.png"
    Image.new("RGB", (40, 28), (0, 255, 0)).save(target)
    os.utime(target, ns=(1, 1))  # a new modification time even on a coarse clock
    second = prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    assert logs[1].startswith("decoded-image cache: built") and second.decoded.folder == folder  # rebuilt in place
    row = [r for r in [*second.train, *second.validation] if r["image_name"] == "p2.png"][0]
    assert (second.decoded.pixels(row["cache_row"]) == (0, 255, 0)).all()
    labels = (dataset / "labels.txt").read_text().replace("p0.png 0 1", "p0.png 1 1")
    (dataset / "labels.txt").write_text(labels)
    relabelled = prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    assert logs[2].startswith("decoded-image cache: reused")  # the pixels do not depend on the labels
    row = [r for r in relabelled.train if r["image_name"] == "p0.png"] or \
        [r for r in relabelled.validation if r["image_name"] == "p0.png"]
    assert row[0]["labels"] == [1, 1]
    prepare_data(dataset, decode_cache=cache_for(tmp_path, logs, size=24)[0])  # another size: another cache
    assert logs[3].startswith("decoded-image cache: built") and "24x24" in logs[3]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_a_broken_cache_folder_is_rebuilt(tmp_path, dataset):
    logs = []
    data = prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    (data.decoded.folder / data.decoded.index["shards"][0]).unlink()
    prepare_data(dataset, decode_cache=cache_for(tmp_path, logs)[0])
    assert logs[1].startswith("decoded-image cache: built")


def test_crop_geometry_stores_the_eval_resize_and_restores_the_aspect(tmp_path, dataset):
    cache, config = cache_for(tmp_path, [], geometry="crop")
    layout = cache.layout
    assert (layout.height, layout.width) == (int(32 / config.crop_pct),) * 2
    data = prepare_data(dataset, decode_cache=cache)
    row = data.train[0]
    restored = CachedRows(data.decoded, restore_aspect=True).image(row["cache_row"])
    width, height = data.decoded.original_size(row["cache_row"])
    assert restored.size[1] == layout.height and abs(restored.size[0] / restored.size[1] - width / height) < 0.03


def training_history(tiny_data, out, **changes):
    from accelerate import Accelerator

    from attrclf.engine import load_training_data, train_and_save

    cfg = tiny_config(tiny_data, out, epochs=1, ema_decay=0.0, hflip=0.0, color_jitter=0.0, random_erasing=0.0,
                      mixed_precision="no", **changes)
    accelerator = Accelerator(cpu=True)
    train_and_save(cfg, load_training_data(cfg, accelerator), accelerator)
    return json.loads((out / "history.json").read_text())


@pytest.mark.slow  # three tiny training runs, about 40 s on 2 loaded cores
def test_training_with_the_cache_equals_training_without(tmp_path, tiny_data, capsys):
    """Augmentation off, the same data order: the cached rows are the pixels the decode + resize gives, so the losses
    match; the device path too (its eval rows are the cache's, its training rows normalised on the device)."""
    without = training_history(tiny_data, tmp_path / "a", decode_cache=False, augment_on="loader")
    cached = training_history(tiny_data, tmp_path / "b", augment_on="loader")
    assert "decoded-image cache: built" in capsys.readouterr().out
    device = training_history(tiny_data, tmp_path / "c", augment_on="device")
    assert "decoded-image cache: reused" in capsys.readouterr().out
    for run in (cached, device):
        assert np.allclose(run["iterations"]["loss"], without["iterations"]["loss"], atol=1e-5)
        assert np.allclose(run["epochs"]["val_loss"], without["epochs"]["val_loss"], atol=1e-6)
