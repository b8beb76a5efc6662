"""The decoded-image cache: each image decoded once, resized to the size training reads, kept as uint8 on disk.

Decoding (`images.load_image`: EXIF, RGB) and resizing a PNG or JPEG costs milliseconds per image and epoch; reading
the same pixels back from a memory-mapped file costs microseconds. On first use every image of the source (all its
splits) is decoded once, resized to `CacheLayout` (the working size of the model's geometry) and written into numpy
`.npy` shards of uint8 (rows, H, W, 3), opened later with `np.load(mmap_mode="r")`: every epoch, later runs,
`--resume`, every fold and every process (DataLoader workers included) read the same pages through the OS page cache.
Why memmap rather than `datasets` Arrow: a row is a zero-copy view (about 10 us) where an Arrow row goes through a
Python conversion (benchmarks/README.md, "decoded-image cache" measures both).

A cache folder, CACHE_ROOT/<source key>-<H>x<W>-<interpolation>/, holds `pixels-00000.npy`, ... (the rows),
`sizes.npy` ((N, 2) int32: each image's width and height before the resize, which the random resized crop needs) and
`index.json` (fingerprint, layout, rows per split, the images that failed to decode with their reasons), written last:
a folder without a matching index is rebuilt. The fingerprint covers, per row, the image name and the image itself
(path, size and modification time of a file; a hash of embedded bytes), so a changed image rebuilds the cache (in
place: the source key covers the image names only). Labels are not in it: the pixels do not depend on them, so runs
that differ only in their labels (a labels file edited, labels hidden for a benchmark) share one cache. With a valid
cache no image is decoded before training: the index already lists the unreadable ones (`images.drop_unreadable` is
not run).

Several runs may share one cache root (jobs side by side on a machine, a sweep over seeds): a folder is built under a
file lock beside it (`.<folder>.lock`, filelock), and whoever gets the lock reads the index again first, so the second
run reuses what the first built instead of decoding again and replacing the folder under the first one's readers.

Layout: "whole" geometry stores each image squashed to the input size, which is exactly the pixels its train and eval
transforms start from; "crop" stores it squashed to the eval resize (input / crop_pct, e.g. 256 for 224) and keeps the
original size, so crop boxes are drawn in original pixels and mapped onto the stored ones (an elongated image keeps
fewer pixels along its long side than a crop of the original would read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from .errors import AttrclfError
from .fileio import atomic_folder, atomic_write_json
from .images import image_problem, load_image
from .model import AttrConfig
from .transforms import PIL_FILTERS

CACHE_VERSION = 1
SHARD_BYTES = 1 << 30  # rows per shard: as many as fit in 1 GiB
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def default_cache_dir() -> Path:
    """ATTRCLF_CACHE/decoded, else ~/.cache/attrclf/decoded (the demo's cache lives beside it)."""
    return Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf")) / "decoded"


@dataclass(frozen=True)
class CacheLayout:
    """The size every image is stored at (squashed: both sides resized on their own) and the resampling filter."""

    height: int
    width: int
    interpolation: str

    @classmethod
    def for_model(cls, config: AttrConfig) -> CacheLayout:
        """"whole": the input size; "crop": the eval transform's resize (input / crop_pct), enough for its centre crop
        and for random resized crops down to about crop_pct**2 of the image at full resolution."""
        height, width = config.input_size[1:]
        if config.geometry == "crop":
            height, width = math.floor(height / config.crop_pct), math.floor(width / config.crop_pct)
        interpolation = config.interpolation if config.interpolation in PIL_FILTERS else "bicubic"
        return cls(height, width, interpolation)

    def resize(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (H, W, 3) uint8, the same PIL resize the eval transform applies."""
        size = (self.width, self.height)
        if image.size != size:
            image = image.resize(size, PIL_FILTERS[self.interpolation])
        return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy of it warns otherwise)

    def name(self) -> str:
        return f"{self.height}x{self.width}-{self.interpolation}"


def decode_resized(source, layout: CacheLayout) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 pixels of one image as `layout` stores it, and its (width, height) before the resize."""
    image = load_image(source)
    return layout.resize(image), image.size


# ---------------------------------------------------------------- fingerprint


def image_identity(source: dict) -> list:
    """What says an image changed: a file's path, size and modification time; a hash of embedded bytes."""
    if source.get("bytes"):
        return ["bytes", hashlib.blake2b(source["bytes"], digest_size=16).hexdigest()]
    path = source["path"]
    try:
        stat = os.stat(path)
    except OSError:
        return ["path", str(path), None, None]
    return ["path", str(path), stat.st_size, stat.st_mtime_ns]


def source_fingerprints(splits: dict, layout: CacheLayout) -> tuple[str, str]:
    """(source key, fingerprint): sha256 of the image names per split (which cache folder), and of everything the
    cached rows depend on: version, layout, and per row its name and image identity."""
    key = hashlib.sha256(f"attrclf-decoded-v{CACHE_VERSION}".encode())
    full = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(layout)]).encode())
    for name in sorted(splits):
        key.update(f"\0split {name}\0".encode())
        full.update(f"\0split {name}\0".encode())
        for batch in splits[name].select_columns(["image", "image_name"]).iter(batch_size=1024):
            for image, image_name in zip(batch["image"], batch["image_name"], strict=True):
                key.update(image_name.encode() + b"\0")
                full.update(json.dumps([image_name, image_identity(image)]).encode())
    return key.hexdigest(), full.hexdigest()


# ---------------------------------------------------------------- the cache on disk


class DecodedImages:
    """An opened cache: rows by index (`pixels`, `original_size`), the rows of each split, the failed images.

    Picklable for DataLoader workers: the memory maps are dropped and reopened in each process.
    """

    def __init__(self, folder: Path, index: dict):
        self.folder, self.index = Path(folder), index
        self.layout = CacheLayout(**index["layout"])
        self.shard_rows = index["shard_rows"]
        self._shards = None
        self._sizes = None

    def __getstate__(self):
        return {**self.__dict__, "_shards": None, "_sizes": None}

    def _open(self) -> None:
        self._shards = [np.load(self.folder / name, mmap_mode="r") for name in self.index["shards"]]
        self._sizes = np.load(self.folder / "sizes.npy")

    def pixels(self, row: int) -> np.ndarray:
        """(H, W, 3) uint8 view of one row (read-only, from the memory map)."""
        if self._shards is None:
            self._open()
        return self._shards[row // self.shard_rows][row % self.shard_rows]

    def original_size(self, row: int) -> tuple[int, int]:
        if self._sizes is None:
            self._open()
        width, height = self._sizes[row]
        return int(width), int(height)

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())


def read_index(folder: Path, fingerprint: str) -> dict | None:
    """The folder's index if it is complete and made from this data, else None."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    if index.get("fingerprint") != fingerprint or index.get("version") != CACHE_VERSION:
        return None
    if not all((folder / name).is_file() for name in [*index["shards"], "sizes.npy"]):
        return None
    return index


def build_cache(folder: Path, splits: dict, layout: CacheLayout, fingerprint: str, *,
                workers: int | None = None) -> dict:
    """Decode every image of every split once (in threads: PIL releases the GIL), write the shards, sizes and index
    into a temporary folder, rename it into place; returns the index."""
    names = sorted(splits)
    counts = {name: len(splits[name]) for name in names}
    total = sum(counts.values())
    shard_rows = max(1, SHARD_BYTES // (layout.height * layout.width * 3))
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with atomic_folder(folder) as staging:
        shard_names = [f"pixels-{k:05d}.npy" for k in range(max(1, math.ceil(total / shard_rows)))]
        shards = [np.lib.format.open_memmap(staging / name, mode="w+", dtype=np.uint8,
                                            shape=(min(shard_rows, total - k * shard_rows), layout.height,
                                                   layout.width, 3)) for k, name in enumerate(shard_names)]
        sizes = np.zeros((total, 2), dtype=np.int32)
        failed, offset = [], 0

        def decode(item):
            row, source, image_name = item
            try:
                pixels, size = decode_resized(source, layout)
            except DECODE_ERRORS as e:
                return row, image_name, image_problem(source) or f"cannot decode ({e})", None, None
            return row, image_name, None, pixels, size

        with ThreadPoolExecutor(workers) as pool:
            for name in names:
                ds = splits[name].select_columns(["image", "image_name"])
                for start in range(0, len(ds), 512):  # in chunks: embedded bytes never all in memory at once
                    chunk = ds[start:start + 512]
                    items = [(offset + start + i, source, image_name) for i, (source, image_name) in
                             enumerate(zip(chunk["image"], chunk["image_name"], strict=True))]
                    for row, image_name, reason, pixels, size in pool.map(decode, items):
                        if reason is not None:
                            failed.append({"split": name, "row": row - offset, "image": image_name, "reason": reason})
                            continue
                        shards[row // shard_rows][row % shard_rows] = pixels
                        sizes[row] = size
                offset += counts[name]
        for shard in shards:
            shard.flush()
        np.save(staging / "sizes.npy", sizes)
        index = {"version": CACHE_VERSION, "fingerprint": fingerprint, "layout": asdict(layout), "rows": counts,
                 "shard_rows": shard_rows, "shards": shard_names, "failed": failed}
        atomic_write_json(staging / "index.json", index)
    return index


@dataclass
class DecodeCache:
    """Where the cache lives and how it is opened for one run: `attach` (called by `sources.prepare_data` in place of
    `images.drop_unreadable`) builds or reuses it and points every row at its cached pixels.

    Args:
        root: --cache-dir.
        layout: The stored size (`CacheLayout.for_model`).
        main_process_first: accelerate's context manager: the main process builds, the others wait, then reuse it.
        log: Where the "built" / "reused" line goes (accelerator.print).
    """

    root: Path
    layout: CacheLayout
    main_process_first: object = nullcontext
    log: object = print

    def open(self, splits: dict) -> DecodedImages:
        """The cache of these splits: reused when its index matches the fingerprint, else (re)built."""
        key, fingerprint = source_fingerprints(splits, self.layout)
        folder = Path(self.root) / f"{key[:20]}-{self.layout.name()}"
        with self.main_process_first():
            start = time.perf_counter()
            index = read_index(folder, fingerprint)
            built = index is None
            if built:
                try:
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    with FileLock(folder.parent / f".{folder.name}.lock"):  # another run may be building it
                        index = read_index(folder, fingerprint)
                        built = index is None
                        if built:
                            index = build_cache(folder, splits, self.layout, fingerprint)
                except OSError as e:
                    raise AttrclfError(f"--cache-dir '{self.root}': cannot write the decoded-image cache "
                                       f"({e.strerror or e}); choose another folder or pass --no-decode-cache") from e
            decoded = DecodedImages(folder, index)
        rows = sum(index["rows"].values())
        self.log(f"decoded-image cache: {'built' if built else 'reused'} {folder} ({rows} images at "
                 f"{self.layout.height}x{self.layout.width}, {decoded.disk_bytes() / 2**20:.1f} MiB on disk, "
                 f"{time.perf_counter() - start:.1f}s)")
        return decoded

    def attach(self, splits: dict) -> tuple[dict, list[dict], DecodedImages]:
        """(splits with a `cache_row` column and the unreadable rows dropped, the dropped ones as
        drop_unreadable reports them, the opened cache)."""
        decoded = self.open(splits)
        failed = {(item["split"], item["row"]) for item in decoded.index["failed"]}
        out, offset = {}, 0
        for name in sorted(splits):
            ds = splits[name].add_column("cache_row", list(range(offset, offset + len(splits[name]))))
            keep = [i for i in range(len(ds)) if (name, i) not in failed]
            out[name] = ds.select(keep) if len(keep) < len(ds) else ds
            offset += len(splits[name])
        skipped = [{"image": item["image"], "reason": item["reason"]} for item in decoded.index["failed"]]
        return {name: out[name] for name in splits}, skipped, decoded


# ---------------------------------------------------------------- rows -> items for the loader


class CachedRows:
    """`Dataset.with_transform` function over cached rows, in place of `loader.BatchTransform`.

    With `transform` (the timm train or eval transform, `--augment-on loader`) each row becomes a PIL image and goes
    through it, as a decoded image would; without, the row stays uint8, (3, H, W), and the item carries its original
    size for the device augmentation (attrclf.device_augment).
    """

    def __init__(self, decoded: DecodedImages, transform=None, *, restore_aspect: bool = False):
        self.decoded, self.transform, self.restore_aspect = decoded, transform, restore_aspect

    def image(self, row: int) -> Image.Image:
        """The cached pixels as a PIL image; for the "crop" geometry resized back to the original aspect (shorter side
        as stored), so timm's crops see the shapes the original had."""
        image = Image.fromarray(np.ascontiguousarray(self.decoded.pixels(row)))
        if not self.restore_aspect:
            return image
        width, height = self.decoded.original_size(row)
        side = min(image.size)
        size = (side, round(side * height / width)) if width <= height else (round(side * width / height), side)
        return image.resize(size, PIL_FILTERS[self.decoded.layout.interpolation]) if size != image.size else image

    def __call__(self, batch: dict) -> dict:
        rows = batch["cache_row"]
        if self.transform is not None:
            return {"pixel_values": [self.transform(self.image(row)) for row in rows], "labels": batch["labels"]}
        return {"pixel_values": [torch.from_numpy(np.array(self.decoded.pixels(row))).permute(2, 0, 1)
                                 for row in rows],
                "original_size": [self.decoded.original_size(row) for row in rows], "labels": batch["labels"]}


class ResizedRows:
    """Without the cache (--no-decode-cache) but with --augment-on device: decode and resize each image in the loader
    as the cache would have stored it; an image that fails is counted as `loader.BatchTransform` counts it."""

    def __init__(self, layout: CacheLayout, failures=None):
        self.layout, self.failures = layout, failures

    def __call__(self, batch: dict) -> dict:
        pixel_values, sizes = [], []
        for source, image_name in zip(batch["image"], batch["image_name"], strict=True):
            try:
                pixels, size = decode_resized(source, self.layout)
            except DECODE_ERRORS:
                pixel_values.append(None)
                sizes.append((0, 0))
                if self.failures is not None:
                    self.failures.add(image_name)
                continue
            pixel_values.append(torch.from_numpy(pixels).permute(2, 0, 1))
            sizes.append(size)
        return {"pixel_values": pixel_values, "original_size": sizes, "labels": batch["labels"]}


# ---------------------------------------------------------------- which rows the loaders read, and where they augment


@dataclass
class DataPath:
    """What the training and validation loaders run per row (None: `loader.BatchTransform` of the timm transform, as
    without a cache), and the batched augmentation the training loop runs on the device (None: in the loader)."""

    train_rows: object = None
    val_rows: object = None
    augment: object = None


def data_path(config: AttrConfig, decoded: DecodedImages | None, *, augment_on: str, train_transform,
              eval_transform, augment_options: dict, channels_last: bool = False, failures=None) -> DataPath:
    """The loaders' row functions for the cache (or none) and --augment-on.

    Args:
        decoded: The opened cache, or None (--no-decode-cache).
        augment_on: "device" or "loader".
        train_transform / eval_transform: The timm transforms (attrclf.transforms) the loader path applies.
        augment_options: crop_scale, hflip, color_jitter, random_erasing (the same as the timm transform's).
        failures: loader.DecodeFailures of the training split (decoding in the loader without a cache).
    """
    from .device_augment import DeviceAugment

    restore = config.geometry == "crop"
    val_rows = CachedRows(decoded, eval_transform, restore_aspect=restore) if decoded is not None else None
    if augment_on == "loader":
        train_rows = CachedRows(decoded, train_transform, restore_aspect=restore) if decoded is not None else None
        return DataPath(train_rows, val_rows, None)
    layout = decoded.layout if decoded is not None else CacheLayout.for_model(config)
    train_rows = CachedRows(decoded) if decoded is not None else ResizedRows(layout, failures)
    augment = DeviceAugment(config, (layout.height, layout.width), channels_last=channels_last, **augment_options)
    return DataPath(train_rows, val_rows, augment)


def decode_cache(cfg, accelerator) -> DecodeCache | None:
    """--decode-cache: the cache at --cache-dir for the model's working size (backbone, --image-size, --geometry),
    built by the main process first; None with --no-decode-cache."""
    if not cfg.decode_cache:
        return None
    config = AttrConfig.for_backbone(cfg.backbone, ["_"], image_size=cfg.image_size, geometry=cfg.geometry)
    return DecodeCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), CacheLayout.for_model(config),
                       main_process_first=accelerator.main_process_first, log=accelerator.print)


def augment_on(cfg, accelerator) -> str:
    """--augment-on; "auto" by the device, as measured (benchmarks/README.md, "Data at scale"), and always the device
    under --na-policy fixmatch (its second view is made from the same uint8 rows)."""
    if cfg.na_policy == "fixmatch":
        return "device"
    if cfg.augment_on != "auto":
        return cfg.augment_on
    return "loader" if accelerator.device.type == "cpu" else "device"
