"""The embedded demo dataset: generated, deterministic, small images whose attributes are visible.

Each image is one shape (a circle or a square, not an attribute) on a textured background. Attributes (1 / 0 / NA):
    outlined         the shape has a thick outline (white on dark backgrounds, black on light ones)
    red              the shape is red (else another hue)
    striped          the shape is striped (else solid); its annotators often said "not sure", so NA is common
    large            the shape is large (else small)
    dark_background  the background is dark (else light)
    dot              a small dot (white on dark, black on light) sits near a corner: rare
About 10% of the other labels are NA, missing at random, as unknown labels usually are.

`python -m attrclf.demo DIR` writes it as labels.txt + images/, the classic format; training uses the same files.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_folder

LABEL_NAMES = ["outlined", "red", "striped", "large", "dark_background", "dot"]
POSITIVE_RATE = {"outlined": 0.35, "red": 0.3, "striped": 0.3, "large": 0.45, "dark_background": 0.5, "dot": 0.08}
NA_RATE = {"striped": 0.3}
DEFAULT_NA_RATE = 0.1
OTHER_HUES = [(40, 170, 60), (40, 90, 210), (225, 200, 40), (150, 60, 190), (30, 170, 180), (235, 130, 30)]
RED = (215, 35, 35)
VERSION = 3


def default_root(num_images: int, image_size: int) -> Path:
    cache = Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf"))
    return cache / f"demo-v{VERSION}-n{num_images}-s{image_size}-seed0"


def draw_example(rng: np.random.Generator, attributes: dict[str, int], size: int) -> Image.Image:
    """One image showing `attributes` (each 0 or 1), drawn at 3x and downsampled for smooth edges."""
    scale = 3
    big = size * scale
    base = rng.integers(20, 70) if attributes["dark_background"] else rng.integers(185, 240)
    noise = rng.normal(0, 10, (size // 4, size // 4, 3))
    background = np.clip(base + noise + rng.normal(0, 8, 3), 0, 255).astype(np.uint8)
    image = Image.fromarray(background).resize((big, big), Image.BILINEAR)
    draw = ImageDraw.Draw(image)

    radius = big * (rng.uniform(0.33, 0.42) if attributes["large"] else rng.uniform(0.18, 0.25))
    margin = radius + big * 0.04
    cx, cy = rng.uniform(margin, big - margin, 2)
    colour = RED if attributes["red"] else OTHER_HUES[rng.integers(len(OTHER_HUES))]
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
    shape = ("circle", "square")[rng.integers(2)]

    mask = Image.new("L", (big, big), 0)
    mask_draw = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    side = radius * 0.85
    if shape == "circle":
        mask_draw.ellipse(box, fill=255)
    else:
        mask_draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=255)
    fill = Image.new("RGB", (big, big), colour)
    if attributes["striped"]:
        stripes = ImageDraw.Draw(fill)
        period = big / rng.uniform(7, 10)
        shade = tuple(int(c * 0.35) for c in colour)
        for k in range(-20, 40):
            x0 = k * period
            stripes.polygon([(x0, 0), (x0 + period / 2, 0), (x0 + period / 2 - big, big), (x0 - big, big)], fill=shade)
    image.paste(fill, (0, 0), mask)
    ink = (245, 245, 245) if attributes["dark_background"] else (20, 20, 20)
    if attributes["outlined"]:
        width = max(2, int(big * 0.035))
        if shape == "circle":
            draw.ellipse(box, outline=ink, width=width)
        else:
            draw.rectangle([cx - side, cy - side, cx + side, cy + side], outline=ink, width=width)

    if attributes["dot"]:
        dot_radius = big * 0.06
        corner = rng.integers(4)
        dx = big * 0.14 if corner % 2 == 0 else big * 0.86
        dy = big * 0.14 if corner < 2 else big * 0.86
        draw.ellipse([dx - dot_radius, dy - dot_radius, dx + dot_radius, dy + dot_radius], fill=ink)
    return image.resize((size, size), Image.LANCZOS)


def generate_labels(rng: np.random.Generator, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, A) true attributes in {0, 1} and (N, A) bool: True where the label is published as NA."""
    rates = np.array([POSITIVE_RATE[n] for n in LABEL_NAMES])
    truth = (rng.random((num_images, len(LABEL_NAMES))) < rates).astype(np.int64)
    na_rates = np.array([NA_RATE.get(n, DEFAULT_NA_RATE) for n in LABEL_NAMES])
    hidden = rng.random((num_images, len(LABEL_NAMES))) < na_rates
    return truth, hidden


def write_demo(root: Path, num_images: int = 3000, image_size: int = 64, seed: int = 0) -> Path:
    """Write the demo as root/labels.txt + root/images/*.png (atomically: a finished folder or none)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth, hidden = generate_labels(rng, num_images)
    with atomic_folder(root) as staging:
        (staging / "images").mkdir()
        lines = ["image " + " ".join(LABEL_NAMES)]
        for i in range(num_images):
            attributes = dict(zip(LABEL_NAMES, truth[i].tolist(), strict=True))
            name = f"demo_{i:05d}.png"
            draw_example(rng, attributes, image_size).save(staging / "images" / name, optimize=False)
            values = ["NA" if hidden[i, j] else str(truth[i, j]) for j in range(len(LABEL_NAMES))]
            lines.append(f"{name} {' '.join(values)}")
        (staging / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def ensure_demo(num_images: int = 3000, image_size: int = 64, root: Path | None = None) -> Path:
    """The demo folder, generated on first use into the cache (ATTRCLF_CACHE or ~/.cache/attrclf)."""
    root = Path(root) if root else default_root(num_images, image_size)
    if not (root / "labels.txt").is_file():
        write_demo(root, num_images, image_size)
    return root


def main(argv: list[str] | None = None) -> int:
    """`attrclf demo DIR` / `python -m attrclf.demo DIR`: write the demo dataset."""
    parser = argparse.ArgumentParser(prog="attrclf demo",
                                     description="Write the attrclf demo dataset as labels.txt + images/.")
    parser.add_argument("output", type=Path, help="folder to write")
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_demo(args.output, args.num_images, args.image_size, args.seed)
    print(f"wrote {args.num_images} images and labels.txt to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
