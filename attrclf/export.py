"""ONNX export of a trained model, checked against PyTorch with onnxruntime.

CLI: python -m attrclf.export MODEL_DIR_OR_HUB_ID out.onnx [--opset 18]

The ONNX graph takes `pixel_values` (batch, C, H, W), already preprocessed as config.json says (resize, crop, mean/std),
and returns `logits` (batch, A); apply a sigmoid for probabilities. The batch axis is dynamic. metadata_props carry
`label_names`, `thresholds` and the whole `attrclf_config` (config.json) as JSON.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import AttrclfError, run_cli
from .fileio import atomic_path
from .model import AttrClassifier
from .predict import Predictor

# The oldest opset that torch's default (torch.export-based) exporter writes; onnxruntime runs it since 1.14.
OPSET = 18
TOLERANCE = 1e-4  # largest accepted |ONNX - PyTorch| logit difference


def to_onnx(model: AttrClassifier, opset: int = OPSET):
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


def export_onnx(model: AttrClassifier, path: str | os.PathLike, opset: int = OPSET) -> dict:
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
        onnx.save(to_onnx(model, opset), temporary)
        diffs = max_abs_diff(model, temporary)
        if max(diffs.values()) > TOLERANCE:
            raise AttrclfError(f"the ONNX graph differs from PyTorch by {max(diffs.values()):.2e} (more than "
                               f"{TOLERANCE:g}); '{path}' was not written. Try another --opset.")
    return diffs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attrclf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL_DIR", help="model folder (or Hub id user/name)")
    parser.add_argument("output", metavar="OUT.onnx", help="ONNX file to write (replaced atomically if it exists)")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version (18 or newer)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # loading and its errors as the predict CLI has them
    model = Predictor.from_pretrained(args.model, revision=args.revision, device="cpu").model
    diffs = export_onnx(model, args.output, args.opset)
    config = model.config
    print(f"wrote {args.output}: input pixel_values (batch, {', '.join(map(str, config.input_size))}), "
          f"output logits (batch, {len(config.label_names)}), opset {args.opset}")
    print("max abs diff vs PyTorch: " + ", ".join(f"batch {b}: {d:.2e}" for b, d in diffs.items()))
    print(f"label_names: {config.label_names}")
    print(f"thresholds: {config.thresholds}")
    print(f"preprocessing: resize/crop to {config.input_size[1]}x{config.input_size[2]} ({config.interpolation}, "
          f"crop_pct {config.crop_pct}), mean {config.mean}, std {config.std}; sigmoid of the logits = probabilities")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m attrclf.export MODEL OUT.onnx`; bad input is one line on stderr and exit code 2."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
