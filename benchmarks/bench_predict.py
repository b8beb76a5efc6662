"""Inference speed: one image end to end (file -> decode -> preprocess -> model -> thresholds), the model alone,
batches.

    python -m benchmarks.bench_predict [--backbone resnet18] [--repeats 50] [--threads N]

Compares attrclf's Predictor (fast eval transform, channels_last, inference mode) with the same model run the seed's way
(torchvision Resize + ToTensor + Normalize, NCHW, no_grad), on emoji PNGs (64 px, upscaled) and on 1600x1200 JPEGs
(generated here: photo-sized inputs are where decoding costs). Random weights: speed does not depend on them.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attrclf import AttrClassifier, AttrConfig, Predictor
from attrclf.predict import apply_thresholds

from .common import EMOJI, table, write_result
from .seed_baseline import seed_transforms


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 95) * 1000)


def time_calls(fns: list, inputs: list, warmup: int = 3) -> list[list[float]]:
    """Seconds per call of each fn on each input; the fns alternate call by call, so load from other processes on a
    shared machine falls on all of them alike."""
    for item in inputs[:warmup]:
        for fn in fns:
            fn(item)
    out = [[] for _ in fns]
    for item in inputs:
        for fn, times in zip(fns, out, strict=True):
            start = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - start)
    return out


def seed_predict(model, transform, device):
    """The seed's inference path: PIL open + convert, torchvision transform, NCHW fp32 forward, threshold 0.5."""
    @torch.no_grad()
    def run(path):
        x = transform(Image.open(path).convert("RGB"))[None].to(device)
        probs = torch.sigmoid(model(x))[0].cpu().numpy()
        return apply_thresholds(probs, model.config.label_names, [0.5] * len(probs))
    return run


def model_alone(model, size: int, device, channels_last: bool):
    """One forward of one image, as a timed call."""
    x = torch.randn(1, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step(_):
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def photo_files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        path = folder / f"photo_{i}.jpg"
        Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def measure(args, device, workdir: Path) -> tuple[list, dict]:
    label_names = ["face", "animal", "hand", "heart", "food", "person", "smile", "flag", "male", "dark_skin"]
    config = AttrConfig.for_backbone(args.backbone, label_names, image_size=args.image_size)
    AttrClassifier(config).save_pretrained(workdir / "model")
    fast = Predictor.from_pretrained(str(workdir / "model"), device=str(device))
    seed_model = AttrClassifier.from_pretrained(str(workdir / "model")).to(device).eval()
    seed_run = seed_predict(seed_model, seed_transforms(config.input_size[1])[1], device)
    emoji = sorted((args.data_dir / "images").glob("*.png"))[: args.repeats]
    inputs = {"emoji 64 px PNG": emoji, "1600x1200 JPEG": photo_files(workdir, min(args.repeats, 20))}
    size = config.input_size[1]
    cases = {f"end to end, {name}": ([fast.predict, seed_run], paths) for name, paths in inputs.items()}
    cases["model alone, 1 image"] = ([model_alone(fast.model, size, device, True),
                                      model_alone(seed_model, size, device, False)], list(range(args.repeats)))
    rows, raw = [], {}
    for what, (fns, items) in cases.items():
        for path_name, seconds in zip(("attrclf", "seed way"), time_calls(fns, items), strict=True):
            p50, p95 = percentiles(seconds)
            rows.append([what, path_name, p50, p95])
            raw[f"{path_name}: {what}"] = {"p50_ms": p50, "p95_ms": p95}
    batch = (emoji * 8)[: args.batch_images]
    start = time.perf_counter()
    fast.predict(batch, batch_size=64)
    rate = len(batch) / (time.perf_counter() - start)
    rows.append([f"batch of {len(batch)} emoji, 64 per forward", "attrclf", f"{rate:.0f} img/s", ""])
    raw["attrclf batch images_per_second"] = rate
    return rows, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data-dir", type=Path, default=EMOJI)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        rows, raw = measure(args, device, Path(workdir))
    print(table(rows, ["what", "path", "p50 ms", "p95 ms"]))
    path = write_result("predict", {"backbone": args.backbone, "image_size": args.image_size, "device": str(device),
                                    "results": raw}, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
