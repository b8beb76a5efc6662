"""The data path at scale: decoded-image cache + batched device augmentation vs today's decode + per-image transforms.

    python -m benchmarks.bench_data [--images 512] [--steps 6] [--rounds 2] [--image-size 224]

Three figures, each side by side in one process (rounds alternate, so load from other jobs falls on both alike):
1. data path per image (decode + augment) at --image-size, one thread: today's `load_image` + timm train transform;
   the cache read + the same timm transform (--augment-on loader); the cache read + `DeviceAugment` on batches of 64
   (--augment-on device, here on the CPU); and, for the choice of implementation, torchvision.transforms.v2 called per
   image on the cached uint8 rows (v2 draws one set of parameters per call); plus the row read alone from the memmap
   and from a `datasets` Arrow table of the same uint8 rows (the choice of format).
2. stage-2 (the last backbone stage unfrozen) training images/s on the emoji subset: today (--no-decode-cache,
   loader) vs cache + loader vs cache + device, `engine.train_one_epoch` over --steps batches per round.
3. time before the first step: `engine.load_training_data` + `setup_training` + the first batch, without the cache
   (the full decode pre-check) vs with the cache reused (nothing decoded).
Random weights (speed does not depend on them). Writes benchmarks/results/data_path.json.
"""

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from attrclf.config import TrainConfig
from attrclf.decodecache import CachedRows
from attrclf.device_augment import DeviceAugment
from attrclf.engine import build_model, load_training_data, setup_training, train_one_epoch
from attrclf.images import load_image
from attrclf.state import RunState
from attrclf.transforms import train_transform

from .common import EMOJI, GROUP_COLUMN, subset_labels, table, write_result


def per_image_ms(function, items, rounds: int) -> float:
    """Median over rounds of the milliseconds per item of `function(items)`."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function(items)
        times.append((time.perf_counter() - start) * 1000 / len(items))
    return float(np.median(times))


def data_path_figures(data, model_config, rounds: int) -> dict:
    """Figure 1 (one thread)."""
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    decoded = data.decoded
    rows = data.train["cache_row"][:256]
    sources = data.train["image"][:256]
    timm_train = train_transform(model_config)
    cached = CachedRows(decoded, timm_train)
    stored = (decoded.layout.height, decoded.layout.width)
    device = DeviceAugment(model_config, stored)
    per_image_v2 = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ColorJitter(0.3, 0.3, 0.3), v2.ToDtype(
        torch.float32, scale=True), v2.Normalize(model_config.mean, model_config.std), v2.RandomErasing(0.1)])

    def today(items):
        for source in items:
            timm_train(load_image(source))

    def cache_loader(items):
        for row in items:
            timm_train(cached.image(row))

    def batched(items):
        for start in range(0, len(items), 64):
            chunk = items[start:start + 64]
            pixels = torch.stack([torch.from_numpy(np.array(decoded.pixels(r))).permute(2, 0, 1) for r in chunk])
            device(pixels, torch.tensor([decoded.original_size(r) for r in chunk]))

    def v2_per_image(items):
        for row in items:
            per_image_v2(torch.from_numpy(np.array(decoded.pixels(row))).permute(2, 0, 1))

    def memmap_read(items):
        for row in items:
            np.array(decoded.pixels(row))

    arrow = arrow_rows(decoded, rows)

    def arrow_read(items):
        for i in range(len(items)):
            np.asarray(arrow[i]["pixels"])

    figures = {}
    for _ in range(rounds):  # rounds interleave the variants
        for name, function, items in (("today: decode + timm transform", today, sources),
                                      ("cache + timm transform (loader)", cache_loader, rows),
                                      ("cache + batched device augment (CPU)", batched, rows),
                                      ("cache + torchvision v2 per image", v2_per_image, rows),
                                      ("row read: memmap", memmap_read, rows),
                                      ("row read: datasets Arrow", arrow_read, rows)):
            figures.setdefault(name, []).append(per_image_ms(function, items, 1))
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    return {name: float(np.median(values)) for name, values in figures.items()}


def arrow_rows(decoded, rows):
    """The same uint8 rows in a `datasets` Array3D column, read with numpy formatting."""
    from datasets import Array3D, Dataset, Features

    height, width = decoded.layout.height, decoded.layout.width
    features = Features({"pixels": Array3D((height, width, 3), "uint8")})
    ds = Dataset.from_dict({"pixels": [np.array(decoded.pixels(r)) for r in rows]}, features=features)
    return ds.with_format("numpy")


def training_rate(parts_by_name: dict, cfg: TrainConfig, accelerator, steps: int, rounds: int) -> dict:
    """Figure 2: images/s of each setup over alternating rounds, after one warm-up batch each."""
    totals = {name: [0, 0.0] for name in parts_by_name}
    for _ in range(rounds + 1):
        for name, (model, loader, optimizer, loss_fn, augment) in parts_by_name.items():
            state = RunState()
            start = time.perf_counter()
            train_one_epoch(model, loader, optimizer, loss_fn, accelerator=accelerator, state=state,
                            cfg=replace(cfg, max_steps=steps if _ else 1), epoch=cfg.head_epochs, augment=augment)
            if _:  # round 0 is the warm-up
                totals[name][0] += state.step * cfg.batch_size
                totals[name][1] += time.perf_counter() - start
    return {name: images / seconds for name, (images, seconds) in totals.items()}


def setup(cfg: TrainConfig, accelerator) -> tuple:
    data = load_training_data(cfg, accelerator)
    model = build_model(cfg, data.label_names)
    parts = setup_training(model, data, cfg, accelerator)
    model.set_trainable(cfg.unfreeze)
    model, optimizer, loader = accelerator.prepare(parts.model, parts.optimizer, parts.train_loader)
    return data, model, (model, loader, optimizer, parts.loss_fn, parts.device_augment)


def time_to_first_batch(cfg: TrainConfig, accelerator) -> float:
    start = time.perf_counter()
    _, _, (_, loader, *_rest) = setup(cfg, accelerator)
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="limit the emoji set to about this many images")
    parser.add_argument("--limit-groups", type=int, default=300)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()
    torch.set_num_threads(2)
    accelerator = Accelerator(cpu=True)
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    labels = subset_labels(EMOJI, work / "labels.txt", args.limit_groups)
    base = TrainConfig(data=str(EMOJI), labels=str(labels), images=str(EMOJI / "images"), group_column=GROUP_COLUMN,
                       backbone=args.backbone, pretrained=False, image_size=args.image_size, batch_size=32,
                       head_epochs=1, unfreeze_stages="1", ema_decay=0.0, mixed_precision="no",
                       cache_dir=str(work / "cache"), output_dir=str(work / "out")).resolve()
    build_start = time.perf_counter()
    data, model, cached_device = setup(replace(base, augment_on="device"), accelerator)
    build_seconds = time.perf_counter() - build_start
    per_image = data_path_figures(data, model.config, rounds=3)
    _, _, today = setup(replace(base, decode_cache=False, augment_on="loader"), accelerator)
    _, _, cached_loader = setup(replace(base, augment_on="loader"), accelerator)
    rates = training_rate({"today (decode + timm, loader)": today, "cache + timm (loader)": cached_loader,
                           "cache + device augment": cached_device}, base, accelerator, args.steps, args.rounds)
    startup = {"no cache (decode pre-check)": [], "cache reused": []}
    for _ in range(2):
        startup["no cache (decode pre-check)"].append(time_to_first_batch(replace(base, decode_cache=False),
                                                                          accelerator))
        startup["cache reused"].append(time_to_first_batch(base, accelerator))
    startup = {name: float(np.median(v)) for name, v in startup.items()}
    images = len(data.train) + len(data.validation)
    payload = {"images": images, "train_images": len(data.train), "image_size": args.image_size,
               "backbone": args.backbone, "cache_build_seconds_incl_setup": build_seconds,
               "cache_mib": data.decoded.disk_bytes() / 2**20, "per_image_ms_one_thread": per_image,
               "stage2_images_per_second": rates, "seconds_to_first_batch": startup,
               "num_workers": base.num_workers}
    path = write_result("data_path", payload)
    reference = per_image["today: decode + timm transform"]
    print(table([[name, round(ms, 3), round(reference / ms, 2)] for name, ms in per_image.items()],
                ["data path per image (1 thread)", "ms", "today / this"]))
    first = rates["today (decode + timm, loader)"]
    print(table([[name, round(rate, 1), round(rate / first, 3)] for name, rate in rates.items()],
                ["stage 2, emoji", "img/s", "vs today"]))
    print(table([[name, round(s, 2)] for name, s in startup.items()], ["before the first step", "seconds"]))
    print(f"{images} images; cache {payload['cache_mib']:.0f} MiB, built (with setup) in {build_seconds:.1f}s; "
          f"-> {path}")


if __name__ == "__main__":
    main()
