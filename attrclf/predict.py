"""Predictor: load a trained model (folder or Hub id), preprocess images, return per-attribute probabilities.

CLI: attrclf predict --model outputs IMAGE [IMAGE|DIR ...] [--threshold T] [--format table|csv|json] [--tta]
     [--backend auto|torch|torch-bf16|onnx|onnx-int8] [--output FILE.csv|.jsonl|.parquet] [--file-list F] [--data D]

What runs the model is a backend (attrclf.backends); many images at once go through attrclf.bulk.
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
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from . import backends
from .backends import BACKENDS, TorchBackend
from .errors import AttrclfError, run_cli
from .fileio import is_hub_id
from .hub import hub_errors
from .images import load_image
from .model import AttrClassifier
from .transforms import FastEvalTransform, eval_transform


def apply_thresholds(probs: np.ndarray, label_names: list[str], thresholds: list[float]) -> dict:
    """One image's (A,) probabilities -> {"probabilities", "thresholds", "present"}."""
    return {
        "probabilities": {name: float(p) for name, p in zip(label_names, probs, strict=True)},
        "thresholds": {name: float(t) for name, t in zip(label_names, thresholds, strict=True)},
        "present": [name for name, p, t in zip(label_names, probs, thresholds, strict=True) if p >= t],
    }


def model_files(model_id: str, revision: str | None = None, **hub) -> backends.ModelFiles:
    """model.safetensors of a folder or Hub repo, and a finder of the files beside it (ONNX exports)."""
    if os.path.isdir(model_id):
        def locate(filename):
            path = Path(model_id) / filename
            return path if path.is_file() else None
        return backends.ModelFiles(Path(model_id) / constants.SAFETENSORS_SINGLE_FILE, locate)
    options = {k: hub[k] for k in ("cache_dir", "token", "local_files_only", "force_download") if k in hub}

    def fetch(filename):
        try:
            return Path(hf_hub_download(model_id, filename, revision=revision, **options))
        except EntryNotFoundError:
            return None
    return backends.ModelFiles(fetch(constants.SAFETENSORS_SINGLE_FILE), fetch)


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


class Preprocessor:
    """The model's eval preprocessing as one picklable callable (bulk predict's decode workers run it): image ->
    (C, H, W) normalised tensor, by FastEvalTransform where the config allows and `fast` is on, else timm's."""

    def __init__(self, config, fast: bool = True):
        self.transform = eval_transform(config)
        self.fast = FastEvalTransform(config) if fast and FastEvalTransform.supports(config) else None

    def __call__(self, image) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(self.fast.load(image))
        return self.transform(load_image(image))


class Predictor:
    """Runs a trained AttrClassifier on images with the model's own preprocessing and thresholds.

    Args:
        model: A trained model (its config carries preprocessing, names and thresholds).
        device: Torch device to run on.
        tta: Test-time augmentation: average the probabilities (not the logits) of each image and its horizontal
            mirror. Doubles the compute; wrong for attributes where left and right differ.
        fast_preprocess: Decode JPEGs at a reduced scale and resize once (FastEvalTransform) where the config allows;
            within about 1e-3 of timm's eval transform in probability.
        channels_last: Run the torch model in NHWC memory layout (faster convolutions on CPU).
        backend: What runs the model (attrclf.backends): default fp32 torch on `model`. `from_pretrained` picks one
            by name, "auto" the fastest here.
    """

    def __init__(self, model: AttrClassifier, device: str | torch.device = "cpu", *, tta: bool = False,
                 fast_preprocess: bool = True, channels_last: bool = True, backend=None):
        self.tta = tta
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()  # kept for every backend: the reference, and for hooks (heatmaps)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.backend = backend or TorchBackend(self.model, self.device, channels_last=channels_last)
        self.choice = None  # what `auto` measured (attrclf.backends.Choice), when it chose the backend
        self.config = model.config
        self.label_names = list(self.config.label_names)
        self.preprocessor = Preprocessor(self.config, fast=fast_preprocess)
        self.transform, self.fast = self.preprocessor.transform, self.preprocessor.fast

    @property
    def backend_name(self) -> str:
        """The backend that runs the model: torch, torch-bf16, onnx or onnx-int8."""
        return self.backend.name

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None, device: str | None = None, *,
                        backend: str = "auto", tta: bool = False, fast_preprocess: bool = True,
                        channels_last: bool = True, **kwargs):
        """Load from a local folder or a Hub repo (strict, safetensors only); the flags are `Predictor`'s.

        `backend` is one of attrclf.backends.BACKENDS; "auto" (the default) takes the fastest one here within
        tolerance, or the one the environment variable ATTRCLF_BACKEND names (to pin a deployment).
        """
        if backend not in BACKENDS:
            raise AttrclfError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        model_id = resolve_model_id(model_id)
        where = f"'{model_id}'" + (f" at revision '{revision}'" if revision else "")
        try:
            with hub_errors(f"load the model {where}", model_id):
                model = AttrClassifier.from_pretrained(model_id, revision=revision, **kwargs)
                files = model_files(model_id, revision, **kwargs)
        except AttrclfError:
            raise
        except Exception as e:  # anything else the Hub client or the weights file raises
            raise AttrclfError(f"could not load model {where}: {type(e).__name__}: {e}") from e
        predictor = cls(model, device or ("cuda" if torch.cuda.is_available() else "cpu"), tta=tta,
                        fast_preprocess=fast_preprocess, channels_last=channels_last)
        if backend == "auto" and os.environ.get("ATTRCLF_BACKEND", "auto") != "auto":
            backend = os.environ["ATTRCLF_BACKEND"]
        if backend == "auto":
            predictor.backend, predictor.choice = backends.auto(predictor.model, predictor.device, files,
                                                                channels_last=channels_last)
        elif backend != "torch":
            predictor.backend = backends.build(backend, predictor.model, predictor.device, files,
                                               channels_last=channels_last)
        return predictor

    def preprocess(self, image) -> torch.Tensor:
        """Path, bytes or PIL image -> (C, H, W) normalised tensor."""
        return self.preprocessor(image)

    def probs_from_pixels(self, pixel_values: list[torch.Tensor], batch_size: int = 32) -> np.ndarray:
        """(N, A) probabilities for preprocessed (C, H, W) tensors, run in batches."""
        out = []
        for start in range(0, len(pixel_values), batch_size):
            batch = torch.stack(pixel_values[start : start + batch_size])
            out.append(self.batch_probs(batch).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    @torch.inference_mode()
    def batch_probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, A) probabilities; with TTA, the mean of the image's and its mirror's."""
        probs = torch.sigmoid(self.backend.logits(pixel_values))
        if self.tta:
            probs = (probs + torch.sigmoid(self.backend.logits(pixel_values.flip(-1)))) / 2
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


def predict_files(predictor: Predictor, paths: list[Path], threshold, batch_size,
                  workers: int | None = 0) -> list[dict]:
    """Results per file, in order; a file that cannot be decoded gets {"image", "error"} instead of stopping the run."""
    from .bulk import PathSources

    return collect_results(predictor, PathSources(paths), threshold, batch_size, workers)


def collect_results(predictor: Predictor, sources, threshold, batch_size, workers: int | None = 0) -> list[dict]:
    """Results of any bulk source (attrclf.bulk) as printed without --output: dicts, unreadable ones with "error"."""
    from .bulk import Prediction, iter_results

    thresholds = predictor.thresholds(threshold)
    results = []
    for result in iter_results(predictor, sources, threshold=threshold, batch_size=batch_size, workers=workers):
        if isinstance(result, Prediction):
            results.append({"image": result.image, **apply_thresholds(result.probs, predictor.label_names, thresholds)})
        else:
            results.append({"image": result[0], "error": result[1]})
    return results


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
    parser = argparse.ArgumentParser(prog="attrclf predict",
                                     description="Predict attributes for images with a trained attrclf model. With "
                                                 "--output FILE the results stream to a CSV / JSONL / Parquet file "
                                                 "(bulk predict; `accelerate launch -m attrclf predict` splits the "
                                                 "images across processes).")
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--model", default="outputs", help="model folder or Hub id (user/name)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one threshold for every attribute (default: the model's tuned per-attribute thresholds)")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table",
                        help="what is printed without --output")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_backend_argument(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities of each image and its horizontal "
                             "mirror (twice the compute; not for attributes where left and right differ)")
    bulk = parser.add_argument_group("bulk predict")
    bulk.add_argument("--output", default=None, metavar="FILE",
                      help="stream the results to FILE: .csv, .jsonl or .parquet (by the extension); unreadable "
                           "images are listed on stderr and skipped")
    bulk.add_argument("--file-list", default=None, metavar="FILE",
                      help="a text file of image paths, one per line (relative to the file's folder)")
    bulk.add_argument("--data", default=None, help="any source `train --data` accepts (labels.txt folder, image "
                                                   "folder with metadata, saved or Hub dataset): its images")
    bulk.add_argument("--split", default=None, help="the split of --data to predict (default: every split, in order)")
    bulk.add_argument("--labels", default=None, help="labels file of --data (as training's --labels)")
    bulk.add_argument("--images", default=None, help="images folder of --data (as training's --images)")
    bulk.add_argument("--workers", type=int, default=None,
                      help="decode workers (default: 0 for a few images, else one per core, at most 4)")
    bulk.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend, shared with `attrclf evaluate`."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="what runs the model: torch (fp32), torch-bf16 (native bf16 CPUs and GPUs), onnx / "
                             "onnx-int8 (the files `attrclf export` writes beside the weights), or auto: the fastest "
                             "of them measured here within tolerance (default; ATTRCLF_BACKEND pins it)")


def check_args(args) -> None:
    resolve_model_id(args.model)  # a wrong model is said first, before the inputs are read
    if args.batch_size < 1:
        raise AttrclfError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.workers is not None and args.workers < 0:
        raise AttrclfError(f"--workers must be 0 or more (got {args.workers})")
    if args.data and (args.inputs or args.file_list):
        raise AttrclfError("--data predicts a dataset's images: give it alone, without image paths or --file-list")
    if not (args.data or args.inputs or args.file_list):
        raise AttrclfError("nothing to predict: give image files or folders, --file-list FILE or --data SOURCE")
    if args.output:
        from .bulk import output_kind

        output_kind(args.output)


def input_sources(args):
    """The images the flags name: paths (files, folders, a file list) or a dataset's rows."""
    from .bulk import PathSources, dataset_sources, expand_inputs, read_file_list

    if args.data:
        return dataset_sources(args.data, args.split, labels=args.labels, images=args.images)
    paths = expand_inputs(args.inputs) if args.inputs else []
    return PathSources(paths + (read_file_list(args.file_list) if args.file_list else []))


def load_predictor(args, device=None) -> Predictor:
    return Predictor.from_pretrained(args.model, revision=args.revision, device=device or args.device, tta=args.tta,
                                     backend=args.backend)


def run_bulk(args, sources) -> int:
    """--output: stream to the file (split across processes under a launcher); a summary line on stderr."""
    from .bulk import distributed_predict, world, write_predictions

    options = dict(threshold=args.threshold, batch_size=args.batch_size, workers=args.workers)
    output = Path(args.output)
    if world()[1] > 1:
        summary = distributed_predict(lambda device: load_predictor(args, device), sources, output,
                                      show_progress=not args.no_progress, **options)
        if summary is None:
            return 0
    else:
        predictor = load_predictor(args)
        predictor.thresholds(args.threshold)  # validate before any work
        summary = write_predictions(predictor, sources, output, show_progress=not args.no_progress,
                                    description=f"predict ({predictor.backend_name})", **options)
    print(f"wrote {summary.written} predictions to {output} ({summary.images_per_second:.1f} img/s, "
          f"{summary.processes} process{'es' if summary.processes > 1 else ''}); "
          f"{len(summary.skipped)} unreadable image(s) skipped", file=sys.stderr)
    return 1 if summary.skipped else 0


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    sources = input_sources(args)
    if args.output:
        return run_bulk(args, sources)
    predictor = load_predictor(args)
    predictor.thresholds(args.threshold)  # validate before any work
    results = collect_results(predictor, sources, args.threshold, args.batch_size, args.workers)
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
    """`attrclf predict`: 0, 1 when some image could not be read, 2 (one line on stderr) on bad input."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
