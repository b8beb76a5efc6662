"""Shards: the on-disk layout of a streamed dataset (WebDataset tar or Parquet), its reader and `attrclf shard`.

A shard set is a list of files read in name order; each file is read from start to end, row by row, from a local
path or any fsspec URL (s3://, gs://, hf://, https://...).

WebDataset tar (`*.tar`): the files of one sample are consecutive tar members sharing a key (the member name up to
its first dot): `KEY.png` (or .jpg / .jpeg / .webp / .bmp / .gif / .tif / .tiff) holds the encoded image, and
`KEY.json` its labels:

    {"labels": {"smiling": 1, "hat": 0, "glasses": null}, "group": "person_17"}

`labels` maps each attribute to 1, 0 or NA (null, "NA", or any token labels.txt accepts); every sample names the same
attributes as the first sample of the first shard (or holds every --label-columns name). `group` is optional (the
value --group-column would give; only the held-out validation rows use it). `.cls` / `.txt` members are not read:
a class index or a bare line cannot name several attributes.

Parquet (`*.parquet`): one row per image, an `image` column (the `datasets` Image struct {bytes, path}), optionally
`image_name` and `group`, and every other scalar column an attribute (1 / 0 / null), unless --label-columns names them.

`attrclf shard DATA OUT` writes either kind from any source attrclf reads (a labels.txt folder, an image folder).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import AttrclfError
from .images import IMAGE_SUFFIXES

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_EXTENSIONS = tuple(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))  # a sample's image member
RESERVED_COLUMNS = ("image", "image_name", "group", "file_name")


@dataclass
class ShardRow:
    """One sample as a shard holds it: its key, the encoded image (None when the sample has none) and label record."""

    key: str
    image: bytes | None
    labels: dict  # attribute -> raw value (parsed later, with the shard and row named)
    group: str | None


def looks_like_shards(data: str | None) -> bool:
    """True for --data naming shards: a *.tar / *.parquet path or glob, or a folder holding such files."""
    if not data:
        return False
    text = str(data)
    if text.endswith(SHARD_SUFFIXES) or any(text.endswith(f"*{s}") for s in SHARD_SUFFIXES):
        return True
    folder = Path(text)
    return "://" not in text and folder.is_dir() and not (folder / "labels.txt").exists() and any(
        p.suffix in SHARD_SUFFIXES for p in folder.iterdir())


def resolve_shards(data: str) -> list[str]:
    """The shard files --data names (a file, a glob or a folder; local or fsspec), sorted by name."""
    import fsspec

    text = str(data)
    if "://" not in text and Path(text).is_dir():
        text = next(str(Path(text) / f"*{s}") for s in SHARD_SUFFIXES if any(Path(text).glob(f"*{s}")))
    files = fsspec.open_files(text)
    urls = sorted({f.full_name if "://" in text else f.path for f in files})
    urls = [u for u in urls if u.endswith(SHARD_SUFFIXES)]
    if not urls:
        raise AttrclfError(f"--data '{data}': no *.tar or *.parquet shard found there")
    kinds = {Path(u).suffix for u in urls}
    if len(kinds) > 1:
        raise AttrclfError(f"--data '{data}': mixes {' and '.join(sorted(kinds))} shards; use one kind")
    return urls


def shard_name(url: str) -> str:
    """The shard's file name, as errors and image names show it."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def read_shard(url: str, label_columns: list[str] | None = None, group_column: str | None = None
               ) -> Iterator[ShardRow]:
    """Every row of one shard, in order."""
    if url.endswith(".parquet"):
        yield from _read_parquet(url, label_columns, group_column)
    else:
        yield from _read_tar(url)


def _read_tar(url: str) -> Iterator[ShardRow]:
    import fsspec

    with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            name_key, _, extension = base.partition(".")
            name_key = member.name[: len(member.name) - len(base)] + name_key
            if key is not None and name_key != key:
                yield _tar_sample(url, key, members)
                members = {}
            key = name_key
            members[extension.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield _tar_sample(url, key, members)


def _tar_sample(url: str, key: str, members: dict[str, bytes]) -> ShardRow:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if "json" not in members:
        return ShardRow(key, image, {"__error__": f"no {key}.json (the labels) in the sample"}, None)
    try:
        record = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return ShardRow(key, image, {"__error__": f"{key}.json is not valid JSON ({e})"}, None)
    labels = record.get("labels") if isinstance(record, dict) else None
    if not isinstance(labels, dict):
        return ShardRow(key, image, {"__error__": f'{key}.json has no "labels" object'}, None)
    group = record.get("group")
    return ShardRow(key, image, labels, None if group is None else str(group))


def _read_parquet(url: str, label_columns, group_column) -> Iterator[ShardRow]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as stream:
        parquet = pq.ParquetFile(stream)
        columns = parquet.schema_arrow.names
        if "image" not in columns:
            raise AttrclfError(f"{shard_name(url)}: no 'image' column (columns: {', '.join(columns)})")
        names = label_columns or [c for c in columns if c not in (*RESERVED_COLUMNS, group_column)]
        group = group_column or ("group" if "group" in columns else None)
        row = 0
        for batch in parquet.iter_batches(batch_size=256):
            table = batch.to_pydict()
            for i in range(batch.num_rows):
                image = table["image"][i]
                key = table["image_name"][i] if "image_name" in table else f"row{row}"
                labels = {n: table[n][i] for n in names if n in table}
                missing = [n for n in names if n not in table]
                if missing:
                    labels = {"__error__": f"no column(s) {', '.join(missing)}"}
                yield ShardRow(str(key), (image or {}).get("bytes"), labels,
                               None if group is None else str(table[group][i]))
                row += 1


# ---------------------------------------------------------------- writing shards: `attrclf shard`


def write_shards(data: str, output: str | Path, *, shard_size: int = 1000, kind: str = "tar",
                 group_column: str | None = None) -> list[Path]:
    """Every row of a labelled source (labels.txt folder, image folder) into shards of `shard_size` rows.

    Rows keep their source order; files are named `shard-00000.tar` ... (or .parquet). Returns the files written.
    """
    from .sources import load_source  # the images are copied as their encoded bytes, never decoded

    source = load_source(data, group_column=group_column)
    rows = [row for split in source.splits.values() for row in split]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for number, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start: start + shard_size]
        path = output / f"shard-{number:05d}.{kind}"
        (_write_tar if kind == "tar" else _write_parquet)(path, chunk, source.label_names)
        written.append(path)
    return written


def _image_bytes(image: dict) -> tuple[bytes, str]:
    if image.get("bytes"):
        return image["bytes"], "png"
    path = Path(image["path"])
    return path.read_bytes(), path.suffix.lstrip(".").lower() or "png"


def _write_tar(path: Path, rows: list[dict], label_names: list[str]) -> None:
    from .fileio import atomic_path

    with atomic_path(path) as temporary, tarfile.open(temporary, "w") as tar:
        for row in rows:
            image, extension = _image_bytes(row["image"])
            key = Path(row["image_name"]).stem.replace(".", "_")
            record = {"labels": dict(zip(label_names, row["labels"], strict=True)), "group": row["group"]}
            for name, payload in ((f"{key}.{extension}", image), (f"{key}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _write_parquet(path: Path, rows: list[dict], label_names: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .fileio import atomic_path

    columns = {"image": [{"bytes": _image_bytes(r["image"])[0], "path": None} for r in rows],
               "image_name": [r["image_name"] for r in rows], "group": [r["group"] for r in rows]}
    for i, name in enumerate(label_names):
        columns[name] = pa.array([r["labels"][i] for r in rows], type=pa.int8())
    with atomic_path(path) as temporary:
        pq.write_table(pa.table(columns), temporary)


def main(argv: list[str] | None = None) -> int:
    """`attrclf shard DATA OUTPUT [--shard-size N] [--format tar|parquet]`."""
    parser = argparse.ArgumentParser(prog="attrclf shard", description="Write a labelled dataset (labels.txt folder "
                                     "or image folder) as WebDataset tar or Parquet shards for --data SHARDS.")
    parser.add_argument("data", help="labels.txt folder, or image folder with metadata.csv / .jsonl")
    parser.add_argument("output", help="folder for shard-00000.tar, shard-00001.tar, ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    parser.add_argument("--format", choices=["tar", "parquet"], default="tar")
    parser.add_argument("--group-column", help="column of labels.txt / metadata whose value goes into each row")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise AttrclfError("--shard-size must be at least 1")
    written = write_shards(args.data, args.output, shard_size=args.shard_size, kind=args.format,
                           group_column=args.group_column)
    print(f"wrote {len(written)} {args.format} shard(s) to {args.output}/")
    return 0


if __name__ == "__main__":
    import sys

    from .errors import run_cli

    sys.exit(run_cli(main))
