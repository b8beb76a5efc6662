"""Real data with small, local attributes: the Tabler icons (npm `@tabler/icons`) rasterised, attributes from names.

    python -m benchmarks.prepare_tabler [--out-dir benchmarks/data/tabler] [--size 64] [--npm-dir ~/.cache/attrclf/npm]

Installs `@tabler/icons@3.52.0` (MIT; 24x24 stroke SVGs: 5,491 outline icons, 1,054 of them also filled, and
icons.json with each icon's category and tags) with npm into a cache folder outside the repository, rasterises every
SVG black on white with resvg (PyPI `resvg-py`, a Rust renderer in one wheel: no system library) and writes

    OUT/labels.txt                 image_name + one column per attribute + base_icon (the group column)
    OUT/images/*.png               SIZE x SIZE greyscale, outline_NAME.png and filled_NAME.png
    OUT/images/metadata.jsonl      the same labels as a `datasets` image folder

Tabler draws a variant of an icon by adding a small status badge in its bottom-right corner: `bell-plus` is `bell`
with a plus there, `bell-check`, `bell-x`, `bell-up` ... likewise; `bell-off` strikes the icon through. Those badges
are the local attributes here. A name is `stem-MODIFIER` when its last word is a modifier and the stem is itself an
icon; modifiers are stripped repeatedly to get the base icon (the group: `bell`, `bell-plus`, `bell-off` and both
styles of each stay on one side of every split). Per badge attribute M:
- 1 when M is one of the stripped modifiers (the icon is an existing icon with the M badge added);
- 0 when the icon's family (its base) has a member with the M badge and this one has none: the designer drew the
  family with and without that badge, so a name without it means no such mark;
- NA otherwise: a family that never has the M badge says nothing (`medical-cross` draws a plus and is not called
  so), and neither does a name whose last word is M but whose stem is no icon (`letter-x`, `arrow-up`, `mood-look-up`:
  the word names the glyph itself, not the badge).
`filled` is 1 for the filled style, 0 for outline (always known). Category attributes are 1 when icons.json's category
is that one, else 0 (every icon has exactly one category, so never NA).
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import resvg_py
from PIL import Image

from .common import label_count_table, write_labelled_images

PACKAGE = "@tabler/icons@3.52.0"
BADGES = ["off", "plus", "minus", "check", "x", "up", "down", "search", "star", "heart", "cog", "question"]
CATEGORIES = {"arrows": "Arrows", "brand": "Brand", "devices": "Devices", "weather": "Weather"}
LABEL_NAMES = [*BADGES, "filled", *CATEGORIES]
GROUP_COLUMN = "base_icon"
# Suffixes that make a variant of the same drawing: stripped for the group (never labels), when the stem is an icon.
VARIANT_WORDS = {*BADGES, "dollar", "share", "exclamation", "bolt", "code", "pause", "cancel", "pin", "spark", "key",
                 "flame", "ai", "edit", "scan", "discount", "bitcoin", "small", "dashed", "filled",
                 *(str(n) for n in range(10))}


def default_npm_dir() -> Path:
    return Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf")) / "npm"


def npm_install(npm_dir: Path) -> Path:
    """The pinned package installed under npm_dir (skipped when already there); returns its folder."""
    name, version = PACKAGE.rsplit("@", 1)
    package = npm_dir / "node_modules" / name
    manifest = package / "package.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["version"] != version:
        if not shutil.which("npm"):
            sys.exit("error: npm is not installed (Debian: apt-get install -y npm)")
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm_dir), PACKAGE], check=True)
    return package


def strip_variants(name: str, names: set[str]) -> tuple[str, list[str]]:
    """(base icon, stripped suffixes) of an icon name: 'bell-plus' -> ('bell', ['plus'])."""
    stripped = []
    while "-" in name:
        stem, last = name.rsplit("-", 1)
        if last not in VARIANT_WORDS or stem not in names:
            break
        name, stripped = stem, [last, *stripped]
    return name, stripped


def icon_labels(icons: dict) -> dict[str, tuple[str, list[int | None]]]:
    """icon name -> (base icon, the labels of LABEL_NAMES except `filled`) from names and categories."""
    names = set(icons)
    parsed = {name: strip_variants(name, names) for name in names}
    family_badges = defaultdict(set)
    for base, stripped in parsed.values():
        family_badges[base].update(stripped)
    out = {}
    for name, (base, stripped) in parsed.items():
        badges = [1 if m in stripped else 0 if m in family_badges[base] else None for m in BADGES]
        categories = [int(icons[name]["category"] == c) for c in CATEGORIES.values()]
        out[name] = (base, badges + categories)
    return out


def entries(package: Path) -> list[dict]:
    """One entry per SVG the package ships: {"source", "name", "base", "labels"}."""
    icons = json.loads((package / "icons.json").read_text())
    labels = icon_labels(icons)
    found = []
    for style in ("outline", "filled"):
        for name in sorted(icons):
            path = package / "icons" / style / f"{name}.svg"
            if style in icons[name]["styles"] and path.is_file():
                base, values = labels[name]
                values = [*values[: len(BADGES)], int(style == "filled"), *values[len(BADGES):]]
                found.append({"source": path, "name": f"{style}_{name}.png", "base": base, "labels": values})
    return found


def rasterise(svg: Path, size: int) -> Image.Image:
    """Black on white, SIZE x SIZE greyscale (the SVGs draw in currentColor)."""
    markup = svg.read_text().replace("currentColor", "#000000")
    png = resvg_py.svg_to_bytes(svg_string=markup, width=size, height=size, background="#ffffff",
                                skip_system_fonts=True)
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("L")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/data/tabler"))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--npm-dir", type=Path, default=default_npm_dir(),
                        help="where npm installs the package (outside the repository)")
    args = parser.parse_args(argv)
    found = entries(npm_install(args.npm_dir))
    write_labelled_images(found, args.out_dir, label_names=LABEL_NAMES, group_column=GROUP_COLUMN,
                          render=lambda entry: rasterise(entry["source"], args.size))
    print(label_count_table(found, LABEL_NAMES))
    size = sum(p.stat().st_size for p in args.out_dir.rglob("*") if p.is_file())
    print(f"wrote {args.out_dir}/ ({size / 2**20:.1f} MiB): labels.txt, images/, images/metadata.jsonl")


if __name__ == "__main__":
    main()
