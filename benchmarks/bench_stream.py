"""Streaming read rate and memory: one pass over local shards, at 1x and 4x the data (issue 13, docs/scale.md).

    python -m benchmarks.bench_stream OUT_DIR [--rows 4000] [--size 224] [--shard-size 500] [--kind tar]
        [--shuffle-buffer 500]

Writes ROWS synthetic JPEG photos-like images (SIZE px, noise + shapes, ~quality 90) once as a labels.txt folder,
shards them (`attrclf shard`), then, each in a fresh process, for 1x (the shards) and 4x (the same shards listed four
times under other names, so the stream is 4x as long): one full pass of `StreamLoader.rows()` (read + label parse,
no decode) and its rows/s, then N batches of decode + the eval transform at 224 px through the decode pool
(--num-workers 1) and their images/s, and the process's peak RSS (ru_maxrss) after each. Prints one JSON line per run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, rows: int, size: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["img a b c d"]
    for n in range(rows):
        pixels = (rng.random((size, size, 3)) * 60 + rng.integers(0, 190, 3)).astype(np.uint8)
        image = Image.fromarray(pixels)
        box = [size // 4, size // 4, size // 2 + n % (size // 2), size * 3 // 4]
        ImageDraw.Draw(image).ellipse(box, fill=(200, 30, 30))
        image.save(folder / "images" / f"p{n:06d}.jpg", quality=90)
        lines.append(f"p{n:06d}.jpg {n % 2} {int(n % 3 == 0)} {'NA' if n % 4 == 0 else n % 5 % 2} {int(n % 7 == 0)}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")


def measure(shards: str, batches: int, shuffle_buffer: int) -> dict:
    import torch

    from attrclf.config import TrainConfig
    from attrclf.model import AttrConfig
    from attrclf.streaming import StreamLoader, prepare_stream
    from attrclf.transforms import eval_transform

    torch.set_num_threads(1)
    cfg = TrainConfig(data=shards, max_steps=1, val_rows=200, stats_rows=200, batch_size=32, num_workers=1,
                      shuffle_buffer=shuffle_buffer, backbone="resnet18", pretrained=False, image_size=224).resolve()
    data = prepare_stream(cfg)
    config = AttrConfig.for_backbone("resnet18", data.label_names, image_size=224)
    loader = StreamLoader(data.stream, eval_transform(config), batch_size=32, steps=batches, workers=1, seed=0, rank=0,
                          world_size=1, shuffle_buffer=cfg.shuffle_buffer, device=torch.device("cpu"))
    start, rows = time.perf_counter(), 0
    for passes, _ in loader.rows():
        if passes:
            break
        rows += 1
    read_seconds = time.perf_counter() - start
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loader = StreamLoader(data.stream, eval_transform(config), batch_size=32, steps=batches, workers=1, seed=0, rank=0,
                          world_size=1, shuffle_buffer=cfg.shuffle_buffer, device=torch.device("cpu"))
    start = time.perf_counter()
    images = sum(len(b[0]) for b in loader)
    decode_seconds = time.perf_counter() - start
    loader.close()
    return {"rows": rows, "read_rows_per_s": round(rows / read_seconds), "rss_after_read_mib": round(rss_read),
            "decoded_images": images, "decode_images_per_s": round(images / decode_seconds, 1),
            "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "shuffle_buffer": cfg.shuffle_buffer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--kind", default="tar", choices=["tar", "parquet"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches, args.shuffle_buffer)))
        return
    out = Path(args.out)
    if not (out / "data" / "labels.txt").is_file():
        make_images(out / "data", args.rows, args.size)
    from attrclf.shards import write_shards

    one = out / f"{args.kind}_1x"
    if not one.is_dir():
        write_shards(str(out / "data"), one, shard_size=args.shard_size, kind=args.kind)
    four = out / f"{args.kind}_4x"
    four.mkdir(exist_ok=True)
    for copy in range(4):
        for shard in sorted(one.iterdir()):
            link = four / f"c{copy}-{shard.name}"
            if not link.exists():
                os.symlink(shard.resolve(), link)
    size = sum(p.stat().st_size for p in one.iterdir())
    for name, folder in (("1x", one), ("4x", four)):
        result = subprocess.run([sys.executable, "-m", "benchmarks.bench_stream", args.out, "--measure", str(folder),
                                 "--batches", str(args.batches), "--shuffle-buffer", str(args.shuffle_buffer)],
                                capture_output=True, text=True, check=True)
        print(json.dumps({"data": name, "shard_bytes_1x": size, **json.loads(result.stdout.strip().splitlines()[-1])}))


if __name__ == "__main__":
    main()
