"""Read a labelled image source into `datasets.Dataset`s, validate it, split it, and turn it into batches.

Every source ends up with the same columns: `image` ({"path", "bytes"}, decoded by `load_image`), `image_name`,
`labels` (one of 1 / 0 / None per attribute; None is NA) and `group` (the split never separates a group).
Sources: a labels.txt + images/ folder (the classic format), a `datasets` image folder with metadata.csv/.jsonl,
a `save_to_disk` folder, or a Hub dataset id.
"""

import csv
import functools
import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets
from datasets import Image as ImageFeature
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

from .errors import AttrclfError
from .model import AttrConfig

NA_POLICIES = ("ignore", "negative")  # what training does with NA: leave it out of the loss, or call it 0
NA_TOKENS = {"na", "n/a", "nan", "null", "none", "-1", ""}
POSITIVE_TOKENS = {"1", "1.0", "true"}
NEGATIVE_TOKENS = {"0", "0.0", "false"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VALIDATION_SPLITS = ("validation", "val", "valid")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
FEATURES = Features(
    {
        "image": ImageFeature(decode=False),
        "image_name": Value("string"),
        "labels": List(Value("int8")),
        "group": Value("string"),
    }
)


@dataclass
class AttrData:
    """A validated, split dataset ready for training.

    Attributes:
        train: Training split.
        validation: Validation split.
        label_names: Attribute names, in label order.
        source: Where the data came from, for logs and the model card.
        split: How the validation split was made.
        skipped: Unreadable images left out, each {"image": name, "reason": text}.
        warnings: Things the user should know that do not stop training.
    """

    train: Dataset
    validation: Dataset
    label_names: list[str]
    source: str
    split: str
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- values and images


def parse_label(value) -> int | None:
    """One label value -> 1, 0 or None (NA). Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return None
        if value in (0, 1):
            return int(value)
        if value == -1:
            return None
        raise ValueError(value)
    token = str(value).strip().lower()
    if token in POSITIVE_TOKENS:
        return 1
    if token in NEGATIVE_TOKENS:
        return 0
    if token in NA_TOKENS:
        return None
    raise ValueError(value)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB: alpha composited on white, 16-bit scaled to 8-bit, CMYK/L/P converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(source, draft=None) -> Image.Image:
    """Open an image from a path, bytes, a `datasets` image dict or a PIL image; return it as RGB.

    Args:
        source: The image.
        draft: Optional (width, height) -> (min width, min height) of the pixels needed: a JPEG then decodes at the
            smallest DCT scale that still covers them (PIL `draft`), several times faster for large photos.

    Raises:
        OSError / UnidentifiedImageError / Image.DecompressionBombError when the file cannot be decoded.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") else source["path"]
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        if draft is not None and image.format == "JPEG":
            rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # transposed after decoding
            width, height = image.size[::-1] if rotated else image.size
            needed = draft(width, height)
            image.draft("RGB", needed[::-1] if rotated else needed)
        image.load()
        return to_rgb(image)


def image_problem(source) -> str | None:
    """Why an image cannot be used (None if it decodes). Cheap: JPEGs decode at reduced scale."""
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    if isinstance(source, (str, Path)):
        if not os.path.isfile(source):
            return "file not found"
        if os.path.getsize(source) == 0:
            return "empty file (0 bytes)"
    try:
        with Image.open(source) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except Image.DecompressionBombError as e:
        return f"too large ({e})"
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError) as e:
        return f"cannot decode ({e})"


# ---------------------------------------------------------------- labels.txt


def read_labels_file(path: Path, group_column: str | None = None) -> tuple[list[str], list[dict]]:
    """Parse a whitespace-separated labels file: image name, then 1 / 0 / NA per attribute; optional header.

    Returns:
        (label_names, rows) where each row is {"image_name", "labels", "group", "line"}.
    """
    if not path.is_file():
        raise AttrclfError(f"labels file '{path}' does not exist (pass --labels FILE or put labels.txt in --data)")
    lines = [
        (number, text.split())
        for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1)
        if text.strip() and not text.lstrip().startswith("#")
    ]
    if not lines:
        raise AttrclfError(f"{path.name}: no data rows (the file is empty)")
    header = None
    if not _all_labels(lines[0][1][1:]):
        header, lines = lines[0], lines[1:]
    if not lines:
        raise AttrclfError(f"{path.name}: only a header line, no data rows")
    width = len(lines[0][1]) - 1
    names = _header_names(path.name, header, width) if header else [f"Attr{i + 1}" for i in range(width)]
    group_index = _group_index(path.name, names, group_column)
    rows, seen = [], {}
    for number, tokens in lines:
        if len(tokens) - 1 != width:
            raise AttrclfError(
                f"{path.name} line {number}: {len(tokens) - 1} values, expected {width} "
                f"(one per attribute after the image name, separated by spaces or tabs)"
            )
        image_name, values = tokens[0], tokens[1:]
        if image_name in seen:
            raise AttrclfError(
                f"{path.name} line {number}: image '{image_name}' is listed again (first on line {seen[image_name]}); "
                f"each image must appear once"
            )
        seen[image_name] = number
        group = values[group_index] if group_index is not None else image_name
        labels = [
            _parse_or_raise(value, f"{path.name} line {number}", name)
            for i, (value, name) in enumerate(zip(values, names))
            if i != group_index
        ]
        rows.append({"image_name": image_name, "labels": labels, "group": group, "line": number})
    label_names = [name for i, name in enumerate(names) if i != group_index]
    return label_names, rows


def _all_labels(tokens: list[str]) -> bool:
    try:
        [parse_label(t) for t in tokens]
        return True
    except ValueError:
        return False


def _header_names(file_name: str, header: tuple[int, list[str]], width: int) -> list[str]:
    number, tokens = header
    if len(tokens) == width + 1:
        tokens = tokens[1:]  # the first header cell names the image column
    elif len(tokens) != width:
        raise AttrclfError(
            f"{file_name} line {number}: the header has {len(tokens)} names but data rows have {width} values "
            f"after the image name; give one name per attribute (optionally preceded by the image column's name)"
        )
    _check_unique(tokens, f"{file_name} line {number}")
    return tokens


def _check_unique(names: list[str], where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise AttrclfError(f"{where}: attribute name '{name}' appears twice in the header; names must be unique")
        seen.add(name)


def check_label_columns(label_columns: list[str], available: list[str], where: str) -> None:
    """--label-columns must name distinct columns that exist in the source."""
    missing = [c for c in label_columns if c not in available]
    if missing:
        raise AttrclfError(
            f"--label-columns: {', '.join(repr(c) for c in missing)} not found in {where} "
            f"(attribute columns there: {', '.join(available)})"
        )
    _check_unique(label_columns, "--label-columns")


def _group_index(file_name: str, names: list[str], group_column: str | None) -> int | None:
    if group_column is None:
        return None
    if group_column not in names:
        raise AttrclfError(f"--group-column: '{group_column}' is not a column of {file_name} (columns: {', '.join(names)})")
    return names.index(group_column)


def _parse_or_raise(value, where: str, attribute: str) -> int | None:
    try:
        return parse_label(value)
    except ValueError:
        raise AttrclfError(f"{where}: value '{value}' for attribute '{attribute}' is not 0, 1 or NA") from None


def select_columns(label_names: list[str], rows: list[dict], label_columns: list[str] | None, where: str):
    """Keep only `label_columns` (in that order); rows are changed in place."""
    if not label_columns:
        return label_names, rows
    check_label_columns(label_columns, label_names, where)
    index = [label_names.index(c) for c in label_columns]
    for row in rows:
        row["labels"] = [row["labels"][i] for i in index]
    return list(label_columns), rows


def rows_to_dataset(rows: list[dict], images_dir: Path, where: str) -> Dataset:
    """Rows with image names relative to `images_dir` -> Dataset; every listed image must exist."""
    if not rows:
        raise AttrclfError(f"{where}: no images listed; the dataset is empty")
    if not images_dir.is_dir():
        raise AttrclfError(f"images folder '{images_dir}' does not exist (pass --images DIR)")
    paths = [images_dir / row["image_name"] for row in rows]
    missing = [row["image_name"] for row, path in zip(rows, paths) if not path.is_file()]
    if missing:
        raise AttrclfError(
            f"{len(missing)} of {len(rows)} images listed in {where} are not in '{images_dir}': "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}\n"
            f"  Check the names (case matters) and --images, or remove those rows."
        )
    return Dataset.from_dict(
        {
            "image": [{"path": str(p), "bytes": None} for p in paths],
            "image_name": [row["image_name"] for row in rows],
            "labels": [row["labels"] for row in rows],
            "group": [str(row["group"]) for row in rows],
        },
        features=FEATURES,
    )


# ---------------------------------------------------------------- image folder with metadata


def find_metadata(folder: Path) -> Path | None:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_metadata(path: Path, label_columns: list[str] | None, group_column: str | None):
    """metadata.csv / metadata.jsonl of a `datasets` image folder -> (label_names, rows).

    `file_name` names the image; every other column is an attribute unless `label_columns` picks them.
    """
    records = _read_records(path)
    if not records:
        raise AttrclfError(f"{path}: no rows; the dataset is empty")
    columns = list(records[0][1].keys())
    if "file_name" not in columns:
        raise AttrclfError(
            f"{path.name}: no 'file_name' column (the `datasets` image folder convention); columns: {', '.join(columns)}"
        )
    if group_column is not None and group_column not in columns:
        raise AttrclfError(f"--group-column: '{group_column}' is not a column of {path.name} (columns: {', '.join(columns)})")
    candidates = [c for c in columns if c not in ("file_name", group_column)]
    if label_columns:
        check_label_columns(label_columns, candidates, path.name)
    names = list(label_columns) if label_columns else candidates
    if not names:
        raise AttrclfError(f"{path.name}: no attribute columns besides 'file_name'")
    rows, seen = [], {}
    for number, record in records:
        image_name = str(record.get("file_name") or "").strip()
        if not image_name:
            raise AttrclfError(f"{path.name} line {number}: empty file_name")
        if image_name in seen:
            raise AttrclfError(
                f"{path.name} line {number}: image '{image_name}' is listed again (first on line {seen[image_name]})"
            )
        seen[image_name] = number
        labels = [_parse_or_raise(record.get(name), f"{path.name} line {number}", name) for name in names]
        group = record.get(group_column) if group_column else image_name
        rows.append({"image_name": image_name, "labels": labels, "group": group, "line": number})
    return names, rows


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a csv or jsonl file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and len(set(reader.fieldnames)) != len(reader.fieldnames):
            dup = next(n for n in reader.fieldnames if reader.fieldnames.count(n) > 1)
            raise AttrclfError(f"{path.name} line 1: column '{dup}' appears twice in the header")
        records = []
        for record in reader:
            if None in record:
                raise AttrclfError(
                    f"{path.name} line {reader.line_num}: {len(reader.fieldnames) + len(record[None])} values, "
                    f"expected {len(reader.fieldnames)}"
                )
            if any(v is None for v in record.values()):
                raise AttrclfError(
                    f"{path.name} line {reader.line_num}: {sum(v is not None for v in record.values())} values, "
                    f"expected {len(reader.fieldnames)}"
                )
            records.append((reader.line_num, record))
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AttrclfError(f"{path.name} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise AttrclfError(f"{path.name} line {number}: expected a JSON object per line")
        if records and record.keys() != records[0][1].keys():
            raise AttrclfError(
                f"{path.name} line {number}: keys {sorted(record)} differ from line {records[0][0]}'s "
                f"{sorted(records[0][1])}"
            )
        records.append((number, record))
    return records


# ---------------------------------------------------------------- Hub / save_to_disk (thin)


def load_hf_dataset(source: str, label_columns: list[str] | None, group_column: str | None):
    """A `save_to_disk` folder or a Hub dataset id -> ({split: Dataset}, label_names)."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise AttrclfError(
            f"--data '{source}': not a labels.txt folder, an image folder with metadata, a saved dataset, "
            f"or a reachable Hub dataset ({type(e).__name__}: {e})"
        ) from e
    splits = loaded if isinstance(loaded, DatasetDict) else {"train": loaded}
    label_names, out = None, {}
    for split_name, ds in splits.items():
        names, ds = normalise_hf_split(ds, f"{source}[{split_name}]", label_columns, group_column)
        label_names = label_names or names
        out[split_name] = ds
    return out, label_names


def normalise_hf_split(ds: Dataset, where: str, label_columns, group_column):
    image_columns = [n for n, f in ds.features.items() if isinstance(f, ImageFeature)]
    if not image_columns:
        raise AttrclfError(f"{where}: no column of type Image (columns: {', '.join(ds.column_names)})")
    image_column = image_columns[0]
    if group_column is not None and group_column not in ds.column_names:
        raise AttrclfError(f"--group-column: '{group_column}' is not a column of {where}")
    scalar = [
        n for n, f in ds.features.items()
        if isinstance(f, Value) and n not in (image_column, group_column, "file_name", "image_name")
    ]
    if label_columns:
        check_label_columns(label_columns, ds.column_names, where)
    names = list(label_columns) if label_columns else scalar
    if not names:
        raise AttrclfError(f"{where}: no attribute columns; name them with --label-columns")
    table = ds.select_columns(names).to_dict()
    labels = [
        [_parse_or_raise(table[name][i], f"{where} row {i}", name) for name in names] for i in range(len(ds))
    ]
    groups = ds[group_column] if group_column else [f"{where}#{i}" for i in range(len(ds))]  # unique across splits
    image_names = ds["image_name"] if "image_name" in ds.column_names else [f"{where}#{i}" for i in range(len(ds))]
    images = ds.cast_column(image_column, ImageFeature(decode=False))[image_column]
    out = Dataset.from_dict(
        {"image": images, "image_name": image_names, "labels": labels, "group": [str(g) for g in groups]},
        features=FEATURES,
    )
    return names, out


# ---------------------------------------------------------------- the whole pipeline


def load_source(
    data: str | Path,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    label_columns: list[str] | None = None,
    group_column: str | None = None,
) -> tuple[dict[str, Dataset], list[str], str]:
    """Any supported source -> ({split: Dataset}, label_names, description)."""
    root = Path(data)
    if labels is not None or (root.is_dir() and (root / "labels.txt").is_file()) or root.is_file():
        labels_path = Path(labels) if labels else (root if root.is_file() else root / "labels.txt")
        base = labels_path.parent
        images_dir = Path(images) if images else (base / "images" if (base / "images").is_dir() else base)
        names, rows = read_labels_file(labels_path, group_column)
        names, rows = select_columns(names, rows, label_columns, labels_path.name)
        return {"train": rows_to_dataset(rows, images_dir, labels_path.name)}, names, f"{labels_path} + {images_dir}/"
    if root.is_dir() and (find_metadata(root) or any(find_metadata(root / s) for s in ("train", *VALIDATION_SPLITS))):
        return _load_image_folder(root, label_columns, group_column)
    if root.is_dir() and not (root / "dataset_info.json").is_file() and not (root / "dataset_dict.json").is_file():
        raise AttrclfError(
            f"--data '{root}': found no labels.txt, metadata.csv / metadata.jsonl or saved dataset there.\n"
            f"  Expected DIR/labels.txt with DIR/images/, or pass --labels FILE and --images DIR."
        )
    if not root.exists() and (str(data).startswith((".", "/", "~")) or str(data).count("/") != 1):
        raise AttrclfError(f"--data '{data}': no such file or folder (and not a Hub dataset id like 'user/name')")
    splits, names = load_hf_dataset(str(data), label_columns, group_column)
    return splits, names, f"dataset {data}"


def _load_image_folder(root: Path, label_columns, group_column):
    splits, label_names = {}, None
    for split_name, folder in [("train", root), ("train", root / "train")] + [(s, root / s) for s in VALIDATION_SPLITS]:
        metadata = find_metadata(folder) if folder.is_dir() else None
        if metadata is None or split_name in splits:
            continue
        names, rows = read_metadata(metadata, label_columns, group_column)
        if label_names is not None and names != label_names:
            raise AttrclfError(f"{metadata}: attribute columns {names} differ from the train split's {label_names}")
        label_names = names
        splits["validation" if split_name in VALIDATION_SPLITS else "train"] = rows_to_dataset(
            rows, metadata.parent, str(metadata)
        )
    return splits, label_names, f"image folder {root}"


def drop_unreadable(ds: Dataset, workers: int | None = None) -> tuple[Dataset, list[dict]]:
    """Decode every image once (in threads); return the readable rows and a list of the others with reasons."""
    sources = ds.cast_column("image", ImageFeature(decode=False))["image"]
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(image_problem, sources))
    bad = [i for i, p in enumerate(problems) if p]
    if not bad:
        return ds, []
    names = ds["image_name"]
    skipped = [{"image": names[i], "reason": problems[i]} for i in bad]
    keep = sorted(set(range(len(ds))) - set(bad))
    return ds.select(keep), skipped


def split_by_group(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split that keeps each group on one side; about `val_fraction` of the rows go to validation."""
    if not 0 < val_fraction < 1:
        raise AttrclfError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    groups = np.asarray(ds["group"])
    unique, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    target = val_fraction * len(ds)
    in_val = np.zeros(len(unique), dtype=bool)
    taken = 0
    for g in order:
        if taken >= target:
            break
        in_val[g] = True
        taken += sizes[g]
    val_rows = in_val[inverse]
    if val_rows.all() or not val_rows.any():
        raise AttrclfError(
            f"cannot split {len(ds)} images in {len(unique)} groups into train and validation "
            f"(--val-fraction {val_fraction}); add images or provide a validation split"
        )
    return ds.select(np.flatnonzero(~val_rows)), ds.select(np.flatnonzero(val_rows))


def data_fingerprint(data: AttrData) -> str:
    """sha256 of what a training run saw: label names, the split description, and each split's images and labels.

    A checkpoint stores it, so that a run is never resumed on other data.
    """
    content = {"label_names": data.label_names, "split": data.split,
               **{name: [list(ds["image_name"]), list(ds["labels"])] for name, ds in
                  (("train", data.train), ("validation", data.validation))}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def fold_of_rows(groups: list[str], folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of every row; rows of a group share a fold; fold sizes as even as the groups allow.

    Groups are shuffled (seeded), then taken largest first, each into the fold that holds the fewest rows so far.
    """
    unique, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if folds < 2 or folds > len(unique):
        raise AttrclfError(f"--folds {folds}: need at least 2 folds and at most one per group "
                           f"({len(unique)} groups in {len(groups)} images)")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group, rows_in_fold = np.zeros(len(unique), dtype=int), np.zeros(folds, dtype=int)
    for g in order:
        fold = int(np.argmin(rows_in_fold))
        fold_of_group[g] = fold
        rows_in_fold[fold] += sizes[g]
    return fold_of_group[inverse]


def make_folds(data: AttrData, folds: int, seed: int) -> list[AttrData]:
    """K-fold cross-validation: all images (train and validation pooled), fold k validates the model trained on the rest."""
    pool = concatenate_datasets([data.train, data.validation])
    fold = fold_of_rows(pool["group"], folds, seed)
    out = []
    for k in range(folds):
        split = f"fold {k + 1} of {folds} (grouped k-fold over {len(pool)} images, seed={seed})"
        out.append(AttrData(pool.select(np.flatnonzero(fold != k)), pool.select(np.flatnonzero(fold == k)),
                            data.label_names, data.source, split, data.skipped, data.warnings))
    return out


def prepare_data(
    data,
    images=None,
    labels=None,
    label_columns=None,
    group_column=None,
    val_fraction: float = 0.2,
    seed: int = 42,
) -> AttrData:
    """Load, validate (unreadable images skipped), split; everything training needs to start."""
    splits, label_names, source = load_source(data, images, labels, label_columns, group_column)
    skipped = []
    for name in list(splits):
        splits[name], bad = drop_unreadable(splits[name])
        skipped += bad
    if "train" not in splits or len(splits["train"]) == 0:
        raise AttrclfError(f"{source}: no readable training images")
    if "validation" in splits:
        train, validation, split = splits["train"], splits["validation"], "the dataset's own validation split"
    else:
        train, validation = split_by_group(splits["train"], val_fraction, seed)
        by = f"grouped by '{group_column}'" if group_column else "by image"
        split = f"seeded random split (val_fraction={val_fraction}, seed={seed}, {by})"
    warnings = [f"attribute '{n}' has no known labels in the training split" for n, c in
                zip(label_names, label_counts(train["labels"], len(label_names))["known"]) if c == 0]
    if len(train) < 2:
        raise AttrclfError(f"{source}: need at least 2 training images, found {len(train)}")
    return AttrData(train, validation, label_names, source, split, skipped, warnings)


# ---------------------------------------------------------------- counts and pos_weight


def label_counts(labels: list[list[int | None]], num_labels: int) -> dict[str, list[int]]:
    """Per attribute: positives, negatives, NA and known counts."""
    array = np.array([[np.nan if v is None else v for v in row] for row in labels], dtype=np.float64)
    array = array.reshape(-1, num_labels)
    pos = (array == 1).sum(0)
    neg = (array == 0).sum(0)
    na = np.isnan(array).sum(0)
    return {"positive": pos.tolist(), "negative": neg.tolist(), "na": na.tolist(), "known": (pos + neg).tolist()}


def compute_pos_weight(counts: dict, label_names: list[str], cap: float = 50.0) -> tuple[torch.Tensor, list[str]]:
    """negatives / positives per attribute, from known labels only, clamped to [1/cap, cap].

    Returns:
        (A,) pos_weight and warnings for attributes whose weight could not be counted.
    """
    weights, warnings = [], []
    for name, pos, neg in zip(label_names, counts["positive"], counts["negative"]):
        if pos + neg == 0:
            warnings.append(f"attribute '{name}' has no known labels in the training split; pos_weight set to 1")
            weights.append(1.0)
        elif pos == 0:
            warnings.append(f"attribute '{name}' has no positive labels in the training split; pos_weight set to 1")
            weights.append(1.0)
        else:
            if neg == 0:
                warnings.append(f"attribute '{name}' has no negative labels in the training split")
            weights.append(float(np.clip(neg / pos, 1.0 / cap, cap)))
    return torch.tensor(weights, dtype=torch.float32), warnings


# ---------------------------------------------------------------- transforms and batches


def eval_transform(config: AttrConfig):
    """The deterministic preprocessing of the model's config (resize, centre crop, normalise)."""
    return create_transform(
        input_size=tuple(config.input_size),
        is_training=False,
        interpolation=config.interpolation,
        mean=tuple(config.mean),
        std=tuple(config.std),
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
    )


def train_transform(
    config: AttrConfig,
    crop_scale: float = 0.5,
    hflip: float = 0.5,
    color_jitter: float = 0.3,
    random_erasing: float = 0.1,
):
    """timm's training transform: random resized crop (scale crop_scale..1), flip, colour jitter, random erasing.

    The crop scale floor is milder than ImageNet's 0.08 on purpose: attributes such as size or position must survive.
    Colour jitter changes brightness, contrast and saturation, never hue.
    """
    return create_transform(
        input_size=tuple(config.input_size),
        is_training=True,
        scale=(crop_scale, 1.0),
        hflip=hflip,
        vflip=0.0,
        color_jitter=color_jitter,
        re_prob=random_erasing,
        interpolation=config.interpolation,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )


class DecodeFailures:
    """How often each image of a split failed to decode during training (it passed the pre-check, then broke).

    The counts live in shared memory, so DataLoader worker processes add to the same table the training loop reads.
    """

    def __init__(self, image_names: list[str]):
        self.image_names = list(image_names)
        self.row = {name: i for i, name in enumerate(self.image_names)}
        self.counts = torch.zeros(len(self.image_names), dtype=torch.int32).share_memory_()

    def add(self, image_name: str) -> None:
        self.counts[self.row[image_name]] += 1

    def take(self) -> list[str]:
        """Names of the images that failed since the last call (each once), and start counting afresh."""
        failed = [self.image_names[i] for i in torch.nonzero(self.counts).flatten().tolist()]
        self.counts.zero_()
        return failed


class BatchTransform:
    """`Dataset.with_transform` function: decode each image (None when it fails) and apply `transform`."""

    def __init__(self, transform, failures: DecodeFailures | None = None):
        self.transform = transform
        self.failures = failures

    def __call__(self, batch: dict) -> dict:
        pixel_values = []
        for i, source in enumerate(batch["image"]):
            try:
                pixel_values.append(self.transform(load_image(source)))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pixel_values.append(None)
                if self.failures is not None:
                    self.failures.add(batch["image_name"][i])
        return {"pixel_values": pixel_values, "labels": batch["labels"]}


def collate(items: list[dict], keep_failed: bool = False,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items -> (pixel_values (B, C, H, W), targets (B, A) float with NA as 0, mask (B, A) bool, True = known).

    Items whose image failed to decode are dropped, or with `keep_failed` kept as a blank image whose labels are all
    NA: evaluation keeps every batch at its size, so that `gather_for_metrics` can drop the padding of the last batch
    across processes by position, and a failed image still adds nothing to a loss or a metric.
    `channels_last` lays the pixels out NHWC, done here in the loader's workers so the training loop gets batches in
    the layout a channels_last model computes fastest on.
    """
    good = [item for item in items if item["pixel_values"] is not None]
    if not good:
        raise AttrclfError("every image in a batch failed to decode")
    if keep_failed:
        blank = torch.zeros_like(good[0]["pixel_values"])
        items = [item if item["pixel_values"] is not None else
                 {"pixel_values": blank, "labels": [None] * len(item["labels"])} for item in items]
    else:
        items = good
    pixel_values = torch.stack([item["pixel_values"] for item in items])
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    labels = [item["labels"] for item in items]
    mask = torch.tensor([[v is not None for v in row] for row in labels], dtype=torch.bool)
    targets = torch.tensor([[float(v or 0) for v in row] for row in labels], dtype=torch.float32)
    return pixel_values, targets, mask


def make_loader(
    ds: Dataset,
    transform,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    sample_weights: list[float] | None = None,
    failures: DecodeFailures | None = None,
    channels_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of `collate` batches; training loaders drop a ragged last batch (BatchNorm needs >= 2).

    With `sample_weights` (one per row, see `balanced_sample_weights`) a seeded WeightedRandomSampler draws len(ds)
    rows with replacement per epoch instead of shuffling. Accelerate shards it correctly over processes: every
    process draws the same sequence (it synchronises the sampler's generator from process 0 at each epoch) and keeps
    its own share of the batches.

    Evaluation loaders (no shuffle) keep images that fail to decode as NA placeholders (see `collate`). Workers are
    started afresh each epoch (not persistent) so that their random streams come from the loader's generator, which
    training re-seeds every epoch: a resumed epoch draws the same augmentations as an uninterrupted one.
    """
    drop_last = shuffle and len(ds) > batch_size
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if sample_weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(ds), replacement=True, generator=generator)
    return torch.utils.data.DataLoader(
        ds.with_transform(BatchTransform(transform, failures)),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, keep_failed=not shuffle, channels_last=channels_last),
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def balanced_sample_weights(labels: list[list[int | None]], num_labels: int, cap: float | None = None) -> list[float]:
    """Per-image sampling weights from rare known positives (the class-balanced sampler).

    weight(image) = max over the attributes the image is KNOWN positive for of known(a) / positives(a), i.e. one over
    the positive frequency among a's known labels; 1 for an image with no known positive. NA never raises a weight.
    `cap` bounds the weights so that one image of a very rare attribute is not drawn hundreds of times an epoch.
    """
    counts = label_counts(labels, num_labels)
    inverse_frequency = [known / pos if pos else 1.0 for pos, known in zip(counts["positive"], counts["known"])]
    weights = [max([1.0] + [w for v, w in zip(row, inverse_frequency) if v == 1]) for row in labels]
    return [min(w, cap) if cap else w for w in weights]


def apply_na_policy(targets: torch.Tensor, mask: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets and mask under --na-policy: "ignore" leaves NA out of the loss; "negative" counts it as 0.

    Only training batches go through this: validation metrics and threshold tuning always skip NA.
    """
    if policy == "ignore":
        return targets, mask
    if policy == "negative":
        return torch.where(mask, targets, torch.zeros_like(targets)), torch.ones_like(mask)
    raise AttrclfError(f"unknown --na-policy '{policy}'; choose one of: {', '.join(NA_POLICIES)}")


def training_counts(labels: list[list[int | None]], num_labels: int, policy: str = "ignore") -> dict[str, list[int]]:
    """label_counts as the training loss sees them: under --na-policy negative, NA counts as a negative."""
    counts = label_counts(labels, num_labels)
    if policy == "negative":
        counts["negative"] = [n + na for n, na in zip(counts["negative"], counts["na"])]
        counts["known"] = [k + na for k, na in zip(counts["known"], counts["na"])]
        counts["na"] = [0] * num_labels
    return counts


# ---------------------------------------------------------------- mixup / cutmix


def mix_known(mask: torch.Tensor, lam: float) -> torch.Tensor:
    """A mixed entry is known only where both sources are known (a source with weight 0 does not count)."""
    return (mask | (lam == 0.0)) & (mask.flip(0) | (lam == 1.0))


def mixup(pixel_values, targets, mask, lam: float):
    """Each image blended with its mirror in the batch (i with B-1-i): lam * own + (1 - lam) * partner."""
    mixed_pixels = pixel_values * lam + pixel_values.flip(0) * (1.0 - lam)
    return mixed_pixels, targets * lam + targets.flip(0) * (1.0 - lam), mix_known(mask, lam)


def cutmix_box(height: int, width: int, lam: float, rng=np.random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of area about (1 - lam) * H * W centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(0, height), rng.randint(0, width)
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def cutmix(pixel_values, targets, mask, box: tuple[int, int, int, int]):
    """The partner's pixels (i with B-1-i) pasted into `box`; lam is the area left to the image's own pixels.

    Returns:
        (pixels, targets, mask, lam), lam = 1 - box area / image area (from the clipped box, not the drawn lam).
    """
    top, bottom, left, right = box
    height, width = pixel_values.shape[-2:]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    mixed_pixels = pixel_values.clone()
    mixed_pixels[..., top:bottom, left:right] = pixel_values.flip(0)[..., top:bottom, left:right]
    return mixed_pixels, targets * lam + targets.flip(0) * (1.0 - lam), mix_known(mask, lam), lam


class BatchMixer:
    """Mixup / CutMix on training batches (never on validation). With both on, each batch picks one, CutMix with
    probability `switch_prob` (timm's switch).

    Draws from numpy's global generator like timm's Mixup, so `accelerate.utils.set_seed` seeds it and
    accelerate's saved training state restores it.

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of mixup's lam; 0 turns mixup off.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix's lam; 0 turns CutMix off.
        switch_prob: Probability of CutMix when both are on.
        rng: numpy.random or a RandomState (tests).
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5, rng=np.random):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise AttrclfError(f"--mixup and --cutmix must be >= 0 (got {mixup_alpha}, {cutmix_alpha})")
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob, self.rng = mixup_alpha, cutmix_alpha, switch_prob, rng

    def __call__(self, pixel_values, targets, mask):
        """(B, C, H, W) pixels, (B, A) targets and mask -> the mixed batch, same shapes."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            box = cutmix_box(*pixel_values.shape[-2:], lam, self.rng)
            return cutmix(pixel_values, targets, mask, box)[:3]
        if self.mixup_alpha > 0:
            return mixup(pixel_values, targets, mask, float(self.rng.beta(self.mixup_alpha, self.mixup_alpha)))
        return pixel_values, targets, mask
