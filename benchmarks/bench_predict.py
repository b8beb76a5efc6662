"""Inference speed: one image end to end (file -> decode -> preprocess -> model -> thresholds), the model alone,
batches; and with --backends, every Predictor backend side by side with the seed's path (issue 12's table).

    python -m benchmarks.bench_predict [--backbone resnet18] [--repeats 50] [--threads N]
    python -m benchmarks.bench_predict --backends [--bulk-images 1000] [--bulk-workers 2]

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

from attrclf import AttrClassifier, AttrConfig, Predictor, backends
from attrclf.bulk import PathSources, write_predictions
from attrclf.export import export_onnx
from attrclf.predict import apply_thresholds
from attrclf.quantize import LabelledImages, quantize

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


def export_backends(workdir: Path, config: AttrConfig, emoji: list[Path], fmt: str) -> Path:
    """A random-weights model folder with model.onnx and model.int8.onnx (calibrated on 128 emoji: speed does not
    depend on the labels, so they are random here; the mAP change is measured on a trained model instead)."""
    folder = workdir / "exported"
    AttrClassifier(config).save_pretrained(folder)
    torch_predictor = Predictor.from_pretrained(str(folder), device="cpu", backend="torch")
    model = torch_predictor.model.to(memory_format=torch.contiguous_format)
    export_onnx(model, folder / "model.onnx", weights_sha256=backends.weights_digest(folder / "model.safetensors"))
    rng = np.random.default_rng(0)
    labels = [[int(v) for v in rng.integers(0, 2, len(config.label_names))] for _ in emoji[:128]]
    quantize(Predictor.from_pretrained(str(folder), device="cpu", backend="torch"), folder / "model.onnx",
             folder / "model.int8.onnx", LabelledImages([str(p) for p in emoji[:128]], labels, "emoji"), fmt)
    return folder


def bulk_rate(fn, paths: list[Path]) -> float:
    start = time.perf_counter()
    fn(paths)
    return len(paths) / (time.perf_counter() - start)


def measure_backends(args, device, workdir: Path) -> tuple[list, dict]:
    """Seed path vs each backend: one image end to end p50, model alone batch 1 p50, bulk img/s; same run."""
    label_names = [f"attr{i}" for i in range(10)]
    config = AttrConfig.for_backbone(args.backbone, label_names, image_size=args.image_size)
    emoji = sorted((args.data_dir / "images").glob("*.png"))
    folder = export_backends(workdir, config, emoji, args.quant_format)
    names = [n for n in ("torch", "torch-bf16", "onnx", "onnx-int8") if n != "torch-bf16" or backends.native_bf16(
        device)]
    predictors = {n: Predictor.from_pretrained(str(folder), device=str(device), backend=n) for n in names}
    seed_model = AttrClassifier.from_pretrained(str(folder)).to(device).eval()
    seed_run = seed_predict(seed_model, seed_transforms(config.input_size[1])[1], device)
    singles = emoji[: args.repeats]
    rows, raw = [], {}
    timed = time_calls([seed_run, *(p.predict for p in predictors.values())], singles)
    x = torch.randn(1, *config.input_size)
    alone = time_calls([model_alone(seed_model, config.input_size[1], device, False),
                        *(lambda _, b=p.backend: b.logits(x) for p in predictors.values())], list(range(args.repeats)))
    seed_single, seed_alone = percentiles(timed[0])[0], percentiles(alone[0])[0]
    rows.append(["seed path", f"{seed_single:.1f}", "1.00x", f"{seed_alone:.1f}", "1.00x", "", ""])
    bulk_paths = (emoji * 2)[: args.bulk_images]
    seed_rate = bulk_rate(lambda paths: [seed_run(p) for p in paths], bulk_paths[: args.seed_bulk_images])
    rows[0][5:] = [f"{seed_rate:.1f}", "1.00x"]
    raw["seed path"] = {"single_p50_ms": seed_single, "model_alone_p50_ms": seed_alone, "bulk_img_s": seed_rate}
    for (name, predictor), single, model_times in zip(predictors.items(), timed[1:], alone[1:], strict=True):
        out = workdir / f"bulk-{name}.csv"
        rate = bulk_rate(lambda paths, p=predictor, o=out: write_predictions(
            p, PathSources(paths), o, batch_size=args.bulk_batch, workers=args.bulk_workers, show_progress=False),
            bulk_paths)
        single_ms, alone_ms = percentiles(single)[0], percentiles(model_times)[0]
        rows.append([name, f"{single_ms:.1f}", f"{seed_single / single_ms:.2f}x", f"{alone_ms:.1f}",
                     f"{seed_alone / alone_ms:.2f}x", f"{rate:.1f}", f"{rate / seed_rate:.2f}x"])
        raw[name] = {"single_p50_ms": single_ms, "model_alone_p50_ms": alone_ms, "bulk_img_s": rate}
    raw["quantization"] = predictors["onnx-int8"].backend.quantization
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
    parser.add_argument("--backends", action="store_true", help="every Predictor backend vs the seed path (issue 12)")
    parser.add_argument("--bulk-images", type=int, default=1000)
    parser.add_argument("--seed-bulk-images", type=int, default=1000, help="images the seed path's loop times")
    parser.add_argument("--bulk-batch", type=int, default=64)
    parser.add_argument("--bulk-workers", type=int, default=2)
    parser.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        if args.backends:
            rows, raw = measure_backends(args, device, Path(workdir))
        else:
            rows, raw = measure(args, device, Path(workdir))
    if args.backends:
        print(table(rows, ["path", "single image p50 ms", "vs seed", "model alone b1 ms", "vs seed",
                           f"bulk {args.bulk_images} img/s", "vs seed"]))
    else:
        print(table(rows, ["what", "path", "p50 ms", "p95 ms"]))
    path = write_result("predict_backends" if args.backends else "predict",
                        {"backbone": args.backbone, "image_size": args.image_size, "device": str(device),
                         "threads": torch.get_num_threads(), "results": raw}, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
