"""Any labelled image source -> `datasets.Dataset`s of one schema, validated and split: what training starts from.

Every source ends up with the columns of `FEATURES`: `image` ({"path", "bytes"}, decoded later by
`images.load_image`), `image_name`, `labels` (1 / 0 / None per attribute; None is NA) and `group` (the split never
separates a group). Sources (`load_source` tells them apart):
- a labels.txt + images/ folder, the classic format (`labels.read_labels_file`);
- a `datasets` image folder with metadata.csv / metadata.jsonl, optionally with train/ and validation/ folders;
- a `save_to_disk` folder or a Hub dataset id (`load_hf_dataset`).
`prepare_data` loads one, drops unreadable images, splits it, and returns an `AttrData`.
"""

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature

from .errors import AttrclfError
from .fileio import is_hub_id
from .images import drop_unreadable
from .labels import (
    check_group_column,
    check_label_columns,
    parse_label_at,
    read_labels_file,
    read_text,
    select_columns,
)
from .splits import split_by_group

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
class LoadedSource:
    """A source read and checked, before unreadable images are dropped and before the split.

    Attributes:
        splits: {"train": Dataset} plus "validation" when the source has its own validation split (every split in
            FEATURES' schema).
        label_names: Attribute names, in label order.
        description: Where the data came from, for logs and the model card.
    """

    splits: dict[str, Dataset]
    label_names: list[str]
    description: str


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
    decoded: object = None  # decodecache.DecodedImages when the rows carry a `cache_row` into the decoded cache


def check_images_dir(images_dir: Path) -> None:
    """The images folder of a labels file or metadata file must exist."""
    if not images_dir.is_dir():
        raise AttrclfError(f"images folder '{images_dir}' does not exist (pass --images DIR)")


def rows_to_dataset(rows: list[dict], images_dir: Path, where: str) -> Dataset:
    """Rows with image names relative to `images_dir` -> Dataset; every listed image must exist."""
    if not rows:
        raise AttrclfError(f"{where}: no images listed; the dataset is empty")
    check_images_dir(images_dir)
    paths = [images_dir / row["image_name"] for row in rows]
    folders = [(row, path) for row, path in zip(rows, paths, strict=True) if path.is_dir()]
    if folders:
        row, path = folders[0]
        line = f" line {row['line']}" if row.get("line") else ""
        more = f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""
        raise AttrclfError(f"{where}{line}: '{row['image_name']}' is a directory in '{images_dir}', not an image "
                           f"file{more}; list image files only")
    missing = [row["image_name"] for row, path in zip(rows, paths, strict=True) if not path.is_file()]
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


def load_source(
    data: str | Path,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    label_columns: list[str] | None = None,
    *,
    group_column: str | None = None,
    header: bool | None = None,
    labels_encoding: str | None = None,
) -> LoadedSource:
    """Any supported source (see the module docstring) -> its splits and attribute names.

    Args:
        data: A folder, a labels file, a saved dataset folder or a Hub dataset id (--data).
        images: The images folder of a labels file (default: images/ beside it, else its folder).
        labels: The labels file (default: labels.txt in `data`).
        label_columns: Attributes to keep, in this order (default: every attribute column).
        group_column: Column whose rows the split keeps together (default: each image alone).
        header: A labels file's first row is a header (True), data (False), or decided from the rows (None).
        labels_encoding: A labels file's text encoding (default UTF-8, with or without BOM).
    """
    root = Path(data)
    if labels is not None or (root.is_dir() and (root / "labels.txt").is_file()) or root.is_file():
        return _load_labels_file(root, images, labels, label_columns, group_column=group_column, header=header,
                                 encoding=labels_encoding)
    if root.is_dir() and (find_metadata(root) or any(find_metadata(root / s) for s in ("train", *VALIDATION_SPLITS))):
        return load_image_folder(root, label_columns, group_column, encoding=labels_encoding)
    if root.is_dir() and not (root / "dataset_info.json").is_file() and not (root / "dataset_dict.json").is_file():
        raise AttrclfError(
            f"--data '{root}': found no labels.txt, metadata.csv / metadata.jsonl or saved dataset there.\n"
            f"  Expected DIR/labels.txt with DIR/images/, or pass --labels FILE and --images DIR."
        )
    if not root.exists() and not is_hub_id(data):
        raise AttrclfError(f"--data '{data}': no such file or folder (and not a Hub dataset id like 'user/name')")
    return load_hf_dataset(str(data), label_columns, group_column)


def _load_labels_file(root: Path, images, labels, label_columns, *, group_column, header, encoding) -> LoadedSource:
    """labels.txt (or --labels FILE) with its images folder (--images, else images/ beside it, else its folder)."""
    labels_path = Path(labels) if labels else (root if root.is_file() else root / "labels.txt")
    base = labels_path.parent
    images_dir = Path(images) if images else (base / "images" if (base / "images").is_dir() else base)
    check_images_dir(images_dir)
    names, rows = read_labels_file(labels_path, group_column, images_dir=images_dir, header=header, encoding=encoding)
    names, rows = select_columns(names, rows, label_columns, labels_path.name)
    return LoadedSource({"train": rows_to_dataset(rows, images_dir, labels_path.name)}, names,
                        f"{labels_path} + {images_dir}/")


# ---------------------------------------------------------------- image folder with metadata


def find_metadata(folder: Path) -> Path | None:
    """metadata.csv or metadata.jsonl of an image folder, if it has one."""
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_image_folder(root: Path, label_columns: list[str] | None, group_column: str | None, *,
                      encoding: str | None = None) -> LoadedSource:
    """A `datasets` image folder: metadata in `root` or `root/train`, and optionally in a validation folder
    (metadata read as UTF-8 with or without BOM, or `encoding`: --labels-encoding)."""
    splits, label_names = {}, None
    for split_name, folder in [("train", root), ("train", root / "train")] + [(s, root / s) for s in VALIDATION_SPLITS]:
        metadata = find_metadata(folder) if folder.is_dir() else None
        if metadata is None or split_name in splits:
            continue
        names, rows = read_metadata(metadata, label_columns, group_column, encoding=encoding)
        if label_names is not None and names != label_names:
            raise AttrclfError(f"{metadata}: attribute columns {names} differ from the train split's {label_names}")
        label_names = names
        splits["validation" if split_name in VALIDATION_SPLITS else "train"] = rows_to_dataset(
            rows, metadata.parent, str(metadata)
        )
    return LoadedSource(splits, label_names, f"image folder {root}")


def read_metadata(path: Path, label_columns: list[str] | None, group_column: str | None, *,
                  encoding: str | None = None):
    """metadata.csv / metadata.jsonl of a `datasets` image folder -> (label_names, rows) as `read_labels_file`'s.

    `file_name` names the image; every other column is an attribute unless `label_columns` picks them.
    """
    text = read_text(path, encoding)
    records = _read_csv(path, text) if path.suffix == ".csv" else _read_jsonl(path, text)
    if not records:
        raise AttrclfError(f"{path}: no rows; the dataset is empty")
    columns = list(records[0][1].keys())
    if "file_name" not in columns:
        raise AttrclfError(
            f"{path.name}: no 'file_name' column (the `datasets` image folder convention); "
            f"columns: {', '.join(columns)}"
        )
    check_group_column(group_column, columns, path.name)
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
        labels = [parse_label_at(record.get(name), f"{path.name} line {number}", name) for name in names]
        group = record.get(group_column) if group_column else image_name
        rows.append({"image_name": image_name, "labels": labels, "group": group, "line": number})
    return names, rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, record) pairs of the csv file `path` (its `text`) with a header; every row as wide as the
    header."""
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


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, record) pairs of the jsonl file `path` (its `text`); every object with the first one's keys."""
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


def load_hf_dataset(source: str, label_columns: list[str] | None, group_column: str | None) -> LoadedSource:
    """A `save_to_disk` folder or a Hub dataset id -> every split it has, in FEATURES' schema."""
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
    return LoadedSource(out, label_names, f"dataset {source}")


def normalise_hf_split(ds: Dataset, where: str, label_columns: list[str] | None,
                       group_column: str | None) -> tuple[list[str], Dataset]:
    """One split of any image dataset -> (label_names, the split in FEATURES' schema), values parsed as labels.txt's."""
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
        [parse_label_at(table[name][i], f"{where} row {i}", name) for name in names] for i in range(len(ds))
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


def prepare_data(
    data: str | Path,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    label_columns: list[str] | None = None,
    *,
    group_column: str | None = None,
    header: bool | None = None,
    labels_encoding: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 42,
    decode_cache=None,
) -> AttrData:
    """Load (`load_source`, same arguments), drop unreadable images, split; everything training needs to start.

    Args:
        val_fraction: Share of the images (whole groups) that validate, when the source has no validation split.
        seed: Seed of that split.
        decode_cache: A `decodecache.DecodeCache`: it finds the unreadable images while it builds (or from its index
            when reused: nothing is decoded) in place of `drop_unreadable`.
    """
    source = load_source(data, images, labels, label_columns, group_column=group_column, header=header,
                         labels_encoding=labels_encoding)
    splits, label_names = dict(source.splits), source.label_names
    skipped, decoded = [], None
    if decode_cache is not None:
        splits, skipped, decoded = decode_cache.attach(splits)
    for name in list(splits) if decode_cache is None else []:
        splits[name], bad = drop_unreadable(splits[name])
        skipped += bad
    if "train" not in splits or len(splits["train"]) == 0:
        raise AttrclfError(f"{source.description}: no readable training images")
    if "validation" in splits:
        train, validation, split = splits["train"], splits["validation"], "the dataset's own validation split"
    else:
        train, validation = split_by_group(splits["train"], val_fraction, seed=seed)
        by = f"grouped by '{group_column}'" if group_column else "by image"
        split = f"seeded random split (val_fraction={val_fraction}, seed={seed}, {by})"
    if len(train) < 2:
        raise AttrclfError(f"{source.description}: need at least 2 training images, found {len(train)}")
    # An attribute without known labels is reported once, by compute_pos_weight, from the split each run trains on
    # (each fold's, under --folds): a second warning here printed it twice.
    return AttrData(train, validation, label_names, source.description, split, skipped, [], decoded)
