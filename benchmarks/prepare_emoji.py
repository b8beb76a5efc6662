"""Real data for the benchmarks: Twitter and Google emoji art (npm packages) with attributes from CLDR annotations.

    python -m benchmarks.prepare_emoji [--out-dir benchmarks/data/emoji] [--npm-dir ~/.cache/attrclf/npm]

Installs `emoji-datasource-twitter@16.0.0`, `emoji-datasource-google@16.0.0` (64x64 palette PNGs) and
`emojibase-data@17.0.0` (CLDR labels and tags, skin tone, gender) with npm into a cache folder outside the repository,
then writes one dataset readable in both attrclf formats, sharing one copy of the images:

    OUT/labels.txt                 image_name + one column per attribute + base_emoji (the group column)
    OUT/images/*.png               RGB, composited on white
    OUT/images/metadata.jsonl      the same labels as a `datasets` image folder (file_name, attributes, base_emoji)

Train with `--data OUT --group-column base_emoji` (or `--data OUT/images --group-column base_emoji`): the same emoji
appears in two art styles and up to five skin tones, so a split that separated them would measure memory, not learning.

Attributes, each 1 / 0 / NA for a stated reason:
- face, animal, hand, heart, food, person, smile, flag: 1 when the emoji's CLDR tags contain one of the words in
  TAG_WORDS, 0 when it has tags and none match, NA when it has no tags (emojibase gives tags to base emoji only, so
  every skin-tone variant is NA here: the "unlabelled" half of a realistic dataset).
- male: 1 for man / boy / king ..., 0 for woman / girl / queen ... (emojibase's gender, else the CLDR name's words),
  NA when neutral, mixed (couples, families) or not a person.
- dark_skin: 1 for skin tones 4-5, 0 for tones 1-2, NA for tone 3, mixed tones or no tone.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .common import label_count_table, write_labelled_images

PACKAGES = ["emoji-datasource-twitter@16.0.0", "emoji-datasource-google@16.0.0", "emojibase-data@17.0.0"]
VENDORS = ["twitter", "google"]
TAG_WORDS = {
    "face": {"face"},
    "animal": {"animal"},
    "hand": {"hand", "hands"},
    "heart": {"heart"},
    "food": {"food", "fruit", "vegetable"},
    "person": {"person", "people", "man", "woman", "men", "women", "boy", "girl"},
    "smile": {"smile", "smiling", "grin"},
    "flag": {"flag"},
}
MALE_WORDS = {"man", "men", "boy", "boys", "king", "prince", "male", "gentleman", "merman", "father", "mr"}
FEMALE_WORDS = {"woman", "women", "girl", "girls", "queen", "princess", "female", "lady", "mermaid", "mother", "mrs"}
PEOPLE_GROUP = 1  # emojibase group "people-body"
LABEL_NAMES = [*TAG_WORDS, "male", "dark_skin"]
GROUP_COLUMN = "base_emoji"


def default_npm_dir() -> Path:
    return Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf")) / "npm"


def npm_install(npm_dir: Path) -> Path:
    """The pinned packages installed under npm_dir (skipped when already there); returns node_modules."""
    modules = npm_dir / "node_modules"
    wanted = {spec.rsplit("@", 1)[0]: spec.rsplit("@", 1)[1] for spec in PACKAGES}
    installed = {name: json.loads((modules / name / "package.json").read_text())["version"]
                 for name in wanted if (modules / name / "package.json").is_file()}
    if installed != wanted:
        if not shutil.which("npm"):
            sys.exit("error: npm is not installed (Debian: apt-get install -y npm)")
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm_dir), *PACKAGES], check=True)
    return modules


def strip_fe0f(hexcode: str) -> str:
    """Emoji data sets disagree on the variation selector FE0F; keys without it match across them."""
    return "-".join(part for part in hexcode.upper().split("-") if part != "FE0F")


def emojibase_index(modules: Path) -> dict[str, dict]:
    """hexcode (no FE0F) -> emojibase record; skin variants carry their base's hexcode as "base"."""
    index = {}
    for record in json.loads((modules / "emojibase-data" / "en" / "data.json").read_text()):
        index[strip_fe0f(record["hexcode"])] = {**record, "base": record["hexcode"]}
        for skin in record.get("skins", []):
            index[strip_fe0f(skin["hexcode"])] = {**skin, "base": record["hexcode"]}
    return index


def male_label(record: dict) -> int | None:
    if "gender" in record:
        return 1 if record["gender"] == 1 else 0
    if record.get("group") != PEOPLE_GROUP:
        return None
    words = set(re.findall(r"[a-z]+", record["label"].lower()))
    male, female = bool(words & MALE_WORDS), bool(words & FEMALE_WORDS)
    return None if male == female else int(male)


def dark_skin_label(record: dict) -> int | None:
    tones = record.get("tone")
    tones = set(tones) if isinstance(tones, list) else {tones} if tones else set()
    if tones and tones <= {4, 5}:
        return 1
    if tones and tones <= {1, 2}:
        return 0
    return None


def attributes(record: dict) -> list[int | None]:
    """The 1 / 0 / None values of LABEL_NAMES for one emojibase record."""
    tags = set(record.get("tags") or [])
    tag_values = [(int(bool(tags & words)) if tags else None) for words in TAG_WORDS.values()]
    return [*tag_values, male_label(record), dark_skin_label(record)]


def image_entries(modules: Path, index: dict) -> list[dict]:
    """Every (vendor, image) the datasource ships with an emojibase record: {"source", "name", "base", "labels"}."""
    entries, unmatched = [], 0
    for vendor in VENDORS:
        package = modules / f"emoji-datasource-{vendor}"
        folder = package / "img" / vendor / "64"
        for emoji in json.loads((package / "emoji.json").read_text()):
            variants = [emoji, *(emoji.get("skin_variations") or {}).values()]
            for variant in variants:
                path = folder / variant["image"]
                if not variant.get(f"has_img_{vendor}") or not path.is_file():
                    continue
                record = index.get(strip_fe0f(variant["unified"]))
                if record is None:
                    unmatched += 1
                    continue
                entries.append({"source": path, "name": f"{vendor}_{variant['image']}",
                                "base": record["base"], "labels": attributes(record)})
    print(f"{len(entries)} images; {unmatched} without an emojibase record left out")
    return entries


def to_rgb_on_white(path: Path) -> Image.Image:
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/data/emoji"))
    parser.add_argument("--npm-dir", type=Path, default=default_npm_dir(),
                        help="where npm installs the packages (outside the repository)")
    args = parser.parse_args(argv)
    modules = npm_install(args.npm_dir)
    entries = image_entries(modules, emojibase_index(modules))
    write_labelled_images(entries, args.out_dir, label_names=LABEL_NAMES, group_column=GROUP_COLUMN,
                          render=lambda entry: to_rgb_on_white(entry["source"]))
    print(label_count_table(entries, LABEL_NAMES))
    size = sum(p.stat().st_size for p in args.out_dir.rglob("*") if p.is_file())
    print(f"wrote {args.out_dir}/ ({size / 2**20:.1f} MiB): labels.txt, images/, images/metadata.jsonl")


if __name__ == "__main__":
    main()
