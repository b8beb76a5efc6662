"""ONNX export of a trained model, checked against PyTorch with onnxruntime, and its int8 quantization.

CLI: attrclf export MODEL_DIR [OUT.onnx] [--opset 18] [--calibrate DATA] [--no-int8] [--quant-format qdq|qoperator]
     [--int8-keep-float first,head|none]

Without OUT.onnx the files go next to model.safetensors, where Predictor's onnx / onnx-int8 backends find them and
`attrclf push` uploads them: model.onnx (fp32) and model.int8.onnx (int8 static quantization calibrated and scored on
the model's validation images: attrclf.quantize; skipped, with a note, when no validation images can be found).
With OUT.onnx, the int8 file is OUT.int8.onnx.

The ONNX graph takes `pixel_values` (batch, C, H, W), already preprocessed as config.json says (resize, crop, mean/std),
and returns `logits` (batch, A); apply a sigmoid for probabilities. The batch axis is dynamic. metadata_props carry
`label_names`, `thresholds`, the whole `attrclf_config` (config.json) and `attrclf_weights_sha256` (the
model.safetensors it came from) as JSON; the int8 file also `attrclf_quantization`.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .backends import ONNX_FILES, WEIGHTS_KEY, weights_digest
from .errors import AttrclfError, run_cli
from .fileio import atomic_path
from .model import AttrClassifier
from .predict import Predictor, model_files
from .quantize import KEEP_FLOAT, NODE_KINDS

# The oldest opset that torch's default (torch.export-based) exporter writes; onnxruntime runs it since 1.14.
OPSET = 18
TOLERANCE = 1e-4  # largest accepted |ONNX - PyTorch| logit difference


def to_onnx(model: AttrClassifier, opset: int = OPSET, weights_sha256: str | None = None):
    """The model as an onnx.ModelProto with a dynamic batch axis and the config in its metadata."""
    model = model.eval()
    example = torch.zeros(2, *model.config.input_size)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=opset, external_data=False, verbose=False,
        input_names=["pixel_values"], output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
    )
    proto = program.model_proto
    metadata = {"label_names": model.config.label_names, "thresholds": model.config.thresholds,
                "attrclf_config": asdict(model.config)}
    if weights_sha256:
        metadata[WEIGHTS_KEY] = weights_sha256
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.doc_string = "attrclf: (batch, C, H, W) preprocessed pixels -> (batch, A) attribute logits"
    return proto


def max_abs_diff(model: AttrClassifier, onnx_path: str | os.PathLike, batch_sizes=(1, 3), seed: int = 0) -> dict:
    """{batch size: max |onnxruntime logits - PyTorch logits|} on seeded random pixels."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for batch_size in batch_sizes:
        pixel_values = torch.randn(batch_size, *model.config.input_size, generator=generator)
        with torch.no_grad():
            expected = model.eval()(pixel_values).numpy()
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        diffs[batch_size] = float(abs(logits - expected).max())
    return diffs


def export_onnx(model: AttrClassifier, path: str | os.PathLike, opset: int = OPSET,
                weights_sha256: str | None = None) -> dict:
    """Write `path` atomically, after checking it against PyTorch; an existing file is replaced only on success.

    Returns:
        {batch size: max abs logit difference} for batches of 1 and 3.

    Raises:
        AttrclfError: the output folder does not exist, or ONNX and PyTorch differ by more than TOLERANCE.
    """
    import onnx

    path = Path(path)
    if not path.parent.is_dir():
        raise AttrclfError(f"output folder '{path.parent}' does not exist; create it or choose another path")
    with atomic_path(path) as temporary:  # same folder, so the rename is atomic; removed on any failure
        onnx.save(to_onnx(model, opset, weights_sha256), temporary)
        diffs = max_abs_diff(model, temporary)
        if max(diffs.values()) > TOLERANCE:
            raise AttrclfError(f"the ONNX graph differs from PyTorch by {max(diffs.values()):.2e} (more than "
                               f"{TOLERANCE:g}); '{path}' was not written. Try another --opset.")
    return diffs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrclf export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL_DIR", help="model folder (or Hub id user/name)")
    parser.add_argument("output", metavar="OUT.onnx", nargs="?", default=None,
                        help="ONNX file to write (replaced atomically if it exists); default MODEL_DIR/model.onnx")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version (18 or newer)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--no-int8", action="store_true", help="write the fp32 graph only")
    parser.add_argument("--calibrate", default=None, metavar="DATA",
                        help="labelled images to calibrate and score the int8 model on (any `train --data` source; "
                             "its validation split if it has one); default: the training run's validation split, "
                             "rebuilt from MODEL_DIR/train_config.json")
    parser.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq",
                        help="onnxruntime's int8 graph form (default qdq: the faster here)")
    parser.add_argument("--int8-keep-float", default=",".join(KEEP_FLOAT), metavar="KINDS",
                        help=f"parts left in fp32, comma-separated from {', '.join(NODE_KINDS)}, or 'none' for all "
                             f"int8 (default {','.join(KEEP_FLOAT)}: the validation mAP held; 'none' ran ResNet18 "
                             f"faster, see benchmarks/README.md 'Fast inference')")
    return parser


def keep_float_of(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip() and k.strip() != "none")
    unknown = [k for k in kinds if k not in NODE_KINDS]
    if unknown:
        raise AttrclfError(f"--int8-keep-float: unknown part(s) {', '.join(unknown)} (choose from "
                           f"{', '.join(NODE_KINDS)}, or 'none')")
    return kinds


def output_paths(args) -> tuple[Path, Path]:
    """(fp32 path, int8 path): beside model.safetensors by default, else OUT.onnx and OUT.int8.onnx."""
    if args.output:
        fp32 = Path(args.output)
        return fp32, fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.onnx")
    if not os.path.isdir(args.model):
        raise AttrclfError(f"'{args.model}' is not a local folder: give OUT.onnx to export a Hub model")
    return Path(args.model) / ONNX_FILES["onnx"], Path(args.model) / ONNX_FILES["onnx-int8"]


def export_int8(predictor: Predictor, args, fp32: Path, int8: Path) -> None:
    from .quantize import Settings, find_images, quantize

    images = find_images(args.model, args.calibrate, predictor.label_names)
    if images is None:
        print(f"int8: skipped, no validation images found (the folder has no train_config.json, or its data is not "
              f"where training read it); pass --calibrate DATA to write {int8.name}")
        return
    settings = Settings(keep_float=keep_float_of(args.int8_keep_float))
    record = quantize(predictor, fp32, int8, images, args.quant_format, settings)
    verdict = "may be the auto default" if record["default_allowed"] else "refused as the auto default"
    print(f"wrote {int8} ({record['format']}): validation mAP {record['mAP_int8']} vs fp32 {record['mAP_fp32']} "
          f"({record['mAP_change_points']:+} points) on {record['images']} images from {record['calibration']}; "
          f"largest probability difference {record['max_prob_diff']:.2e}; fp32 parts: "
          f"{','.join(record['keep_float']) or 'none'}; {verdict}")


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    keep_float_of(args.int8_keep_float)  # a bad list fails before the export, not after
    fp32, int8 = output_paths(args)
    # loading and its errors as the predict CLI has them
    predictor = Predictor.from_pretrained(args.model, revision=args.revision, device="cpu", backend="torch")
    model = predictor.model.to(memory_format=torch.contiguous_format)
    digest = weights_digest(model_files(args.model, args.revision).weights)
    diffs = export_onnx(model, fp32, args.opset, digest)
    config = model.config
    print(f"wrote {fp32}: input pixel_values (batch, {', '.join(map(str, config.input_size))}), "
          f"output logits (batch, {len(config.label_names)}), opset {args.opset}")
    print("max abs diff vs PyTorch: " + ", ".join(f"batch {b}: {d:.2e}" for b, d in diffs.items()))
    print(f"label_names: {config.label_names}")
    print(f"thresholds: {config.thresholds}")
    print(f"preprocessing: resize/crop to {config.input_size[1]}x{config.input_size[2]} ({config.interpolation}, "
          f"crop_pct {config.crop_pct}), mean {config.mean}, std {config.std}; sigmoid of the logits = probabilities")
    if not args.no_int8:
        export_int8(predictor, args, fp32, int8)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m attrclf.export MODEL OUT.onnx`; bad input is one line on stderr and exit code 2."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
