"""Predictor: load a trained model (folder or Hub id), preprocess images, return per-attribute probabilities.

CLI: python -m attrclf.predict --model outputs IMAGE [IMAGE|DIR ...] [--threshold T] [--format table|csv|json] [--tta]
"""

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import AttrclfError, run_cli
from .fileio import is_hub_id
from .hub import hub_errors
from .images import IMAGE_SUFFIXES, load_image
from .model import AttrClassifier
from .transforms import FastEvalTransform, eval_transform


def apply_thresholds(probs: np.ndarray, label_names: list[str], thresholds: list[float]) -> dict:
    """One image's (A,) probabilities -> {"probabilities", "thresholds", "present"}."""
    return {
        "probabilities": {name: float(p) for name, p in zip(label_names, probs, strict=True)},
        "thresholds": {name: float(t) for name, t in zip(label_names, thresholds, strict=True)},
        "present": [name for name, p, t in zip(label_names, probs, thresholds, strict=True) if p >= t],
    }


def resolve_model_id(model: str | os.PathLike) -> str:
    """A local folder, or a Hub id; a path-looking name that is not a folder is a clear error."""
    text = str(model)
    if os.path.isdir(text):
        return text
    if not is_hub_id(text):
        raise AttrclfError(
            f"model '{text}' is neither a model folder nor a Hub id (user/name). "
            f"Train one with `accelerate launch train.py` (it writes outputs/) or pass --model user/name."
        )
    return text


class Predictor:
    """Runs a trained AttrClassifier on images with the model's own preprocessing and thresholds.

    Args:
        model: A trained model (its config carries preprocessing, names and thresholds).
        device: Torch device to run on.
        tta: Test-time augmentation: average the probabilities (not the logits) of each image and its horizontal
            mirror. Doubles the compute; wrong for attributes where left and right differ.
        fast_preprocess: Decode JPEGs at a reduced scale and resize once (FastEvalTransform) where the config allows;
            within about 1e-3 of timm's eval transform in probability.
        channels_last: Run the model in NHWC memory layout (faster convolutions on CPU).
    """

    def __init__(self, model: AttrClassifier, device: str | torch.device = "cpu", *, tta: bool = False,
                 fast_preprocess: bool = True, channels_last: bool = True):
        self.tta = tta
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.config = model.config
        self.label_names = list(self.config.label_names)
        self.transform = eval_transform(self.config)
        use_fast = fast_preprocess and FastEvalTransform.supports(self.config)
        self.fast = FastEvalTransform(self.config) if use_fast else None

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None, device: str | None = None, *,
                        tta: bool = False, fast_preprocess: bool = True, channels_last: bool = True, **kwargs):
        """Load from a local folder or a Hub repo (strict, safetensors only); the flags are `Predictor`'s."""
        model_id = resolve_model_id(model_id)
        where = f"'{model_id}'" + (f" at revision '{revision}'" if revision else "")
        try:
            with hub_errors(f"load the model {where}", model_id):
                model = AttrClassifier.from_pretrained(model_id, revision=revision, **kwargs)
        except AttrclfError:
            raise
        except Exception as e:  # anything else the Hub client or the weights file raises
            raise AttrclfError(f"could not load model {where}: {type(e).__name__}: {e}") from e
        return cls(model, device or ("cuda" if torch.cuda.is_available() else "cpu"), tta=tta,
                   fast_preprocess=fast_preprocess, channels_last=channels_last)

    def preprocess(self, image) -> torch.Tensor:
        """Path, bytes or PIL image -> (C, H, W) normalised tensor."""
        if self.fast is not None:
            return self.fast(self.fast.load(image))
        return self.transform(load_image(image))

    @torch.inference_mode()
    def probs_from_pixels(self, pixel_values: list[torch.Tensor], batch_size: int = 32) -> np.ndarray:
        """(N, A) probabilities for preprocessed (C, H, W) tensors, run in batches."""
        out = []
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        for start in range(0, len(pixel_values), batch_size):
            batch = torch.stack(pixel_values[start : start + batch_size]).to(self.device, memory_format=layout)
            out.append(self.batch_probs(batch).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    @torch.no_grad()
    def batch_probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) on the device -> (B, A) probabilities; with TTA, the mean of the image's and its mirror's."""
        probs = torch.sigmoid(self.model(pixel_values).float())
        if self.tta:
            probs = (probs + torch.sigmoid(self.model(pixel_values.flip(-1)).float())) / 2
        return probs

    def predict_probs(self, images: list, batch_size: int = 32) -> np.ndarray:
        """(N, A) probabilities for a list of images (paths, bytes or PIL images)."""
        return self.probs_from_pixels([self.preprocess(image) for image in images], batch_size)

    def thresholds(self, threshold: float | None = None) -> list[float]:
        """The model's tuned per-attribute thresholds, or one global `threshold` for all."""
        if threshold is None:
            return list(self.config.thresholds)
        if not 0.0 <= threshold <= 1.0:
            raise AttrclfError(f"threshold must be between 0 and 1 (got {threshold})")
        return [float(threshold)] * len(self.label_names)

    def predict(self, images, threshold: float | None = None, batch_size: int = 32):
        """Results for one image (a dict) or a list of images (a list of dicts).

        Each result: {"probabilities": {attribute: p}, "thresholds": {attribute: t}, "present": [attribute, ...]}.
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        thresholds = self.thresholds(threshold)
        results = [apply_thresholds(p, self.label_names, thresholds) for p in self.predict_probs(batch, batch_size)]
        return results[0] if single else results


# ---------------------------------------------------------------- command line


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files as given, and the image files inside given folders (sorted, not recursive)."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            paths.append(path)
        else:
            raise AttrclfError(f"'{item}': no such image file or folder")
    if not paths:
        raise AttrclfError(f"no images found in: {', '.join(inputs)}")
    return paths


def predict_files(predictor: Predictor, paths: list[Path], threshold, batch_size) -> list[dict]:
    """Results per file; a file that cannot be decoded gets {"image", "error"} instead of stopping the run."""
    readable, results = [], {}
    for path in paths:
        try:
            readable.append((path, predictor.preprocess(path)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            results[path] = {"image": str(path), "error": f"cannot read image: {e}"}
    thresholds = predictor.thresholds(threshold)
    probs = predictor.probs_from_pixels([tensor for _, tensor in readable], batch_size)
    for (path, _), p in zip(readable, probs, strict=True):
        results[path] = {"image": str(path), **apply_thresholds(p, predictor.label_names, thresholds)}
    return [results[path] for path in paths]


def format_table(results: list[dict]) -> str:
    rule = "-" * 50
    blocks = []
    for result in results:
        lines = [rule, f"  Image : {result['image']}", rule]
        if "error" in result:
            lines += [f"  error : {result['error']}", rule]
            blocks.append("\n".join(lines))
            continue
        lines.append(f"  {'Attribute':<20} {'Probability':>11} {'Threshold':>9}   Status")
        lines.append("  " + "-" * 48)
        for name, p in result["probabilities"].items():
            status = "[PRESENT]" if name in result["present"] else "[absent]"
            lines.append(f"  {name:<20} {p:>11.4f} {result['thresholds'][name]:>9.3f}   {status}")
        lines += [rule, f"  Attributes present : {result['present']}", rule]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def format_csv(results: list[dict], label_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", *label_names, "present", "error"])
    for r in results:
        probs = [f"{r['probabilities'][n]:.6f}" for n in label_names] if "error" not in r else [""] * len(label_names)
        writer.writerow([r["image"], *probs, ";".join(r.get("present", [])), r.get("error", "")])
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attrclf.predict",
                                     description="Predict attributes for images with a trained attrclf model.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--model", default="outputs", help="model folder or Hub id (user/name)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one threshold for every attribute (default: the model's tuned per-attribute thresholds)")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities of each image and its horizontal "
                             "mirror (twice the compute; not for attributes where left and right differ)")
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    predictor = Predictor.from_pretrained(args.model, revision=args.revision, device=args.device, tta=args.tta)
    predictor.thresholds(args.threshold)  # validate before any work
    results = predict_files(predictor, expand_inputs(args.inputs), args.threshold, args.batch_size)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    elif args.format == "csv":
        sys.stdout.write(format_csv(results, predictor.label_names))
    else:
        print(format_table(results))
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(results)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m attrclf.predict`: 0, 1 when some image could not be read, 2 (one line on stderr) on bad input."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
