"""Bulk predict: many images through a DataLoader (decode workers, batches), results streamed to a file in input order.

    attrclf predict --model M DIR_OR_FILES... --output preds.csv|.jsonl|.parquet [--workers 4] [--batch-size 64]
    attrclf predict --model M --file-list paths.txt --output preds.jsonl
    attrclf predict --model M --data SOURCE [--split test] --output preds.parquet
    accelerate launch -m attrclf predict ...     (the images split across processes; one merged file, input order)

Images are decoded and preprocessed in DataLoader workers (the Predictor's own preprocessing, so the geometry is
config.json's); the main process runs the model batch by batch and writes each batch's rows as soon as it has them, so
memory stays constant in the number of images. An image that cannot be read is reported on stderr and skipped; the
others go on. Under `accelerate launch` (WORLD_SIZE > 1) rank r takes the r-th contiguous share of the images and
writes a part file; rank 0 then concatenates the parts in rank order, which is input order.

Output columns: `image` (the path or dataset image name), one probability per attribute (the model's order, named by
the attribute), `present` (the attributes at or above their threshold: ';'-joined in CSV, a list in JSONL / Parquet).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import AttrclfError
from .fileio import atomic_path
from .images import IMAGE_SUFFIXES

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


# ---------------------------------------------------------------- what to predict


class PathSources:
    """Image files by index: name = the path as given."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, index: int) -> tuple[str, object]:
        return self.paths[index], self.paths[index]


class DatasetSources:
    """Rows of `datasets` splits (attrclf.sources' schema) by index, each row read only when it is needed."""

    def __init__(self, splits: list):
        self.splits = splits
        self.offsets = np.cumsum([0] + [len(ds) for ds in splits])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def item(self, index: int) -> tuple[str, object]:
        split = int(np.searchsorted(self.offsets, index, side="right")) - 1
        row = self.splits[split][index - int(self.offsets[split])]
        return row["image_name"], row["image"]


class Share:
    """Rows start..stop of a source: one process's part."""

    def __init__(self, sources, start: int, stop: int):
        self.sources, self.start, self.stop = sources, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def item(self, index: int):
        return self.sources.item(self.start + index)


def read_file_list(path: str | os.PathLike) -> list[Path]:
    """One image path per line (blank lines and '#' comments skipped); relative paths are relative to the list's
    folder. A listed file that does not exist is kept: it is reported and skipped like an unreadable image."""
    path = Path(path)
    if not path.is_file():
        raise AttrclfError(f"--file-list '{path}': no such file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    paths = [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines
             if line and not line.startswith("#")]
    if not paths:
        raise AttrclfError(f"--file-list '{path}' lists no images")
    return paths


def dataset_sources(data: str, split: str | None = None, *, labels=None, images=None) -> DatasetSources:
    """Any `--data` source training accepts (attrclf.sources): `split`, or every split it has, in order."""
    from .sources import load_source  # imports `datasets`: only for --data

    source = load_source(data, images, labels)
    if split is not None and split not in source.splits:
        raise AttrclfError(f"--data '{data}' has no split '{split}' (it has {', '.join(source.splits)})")
    names = [split] if split else list(source.splits)
    return DatasetSources([source.splits[name] for name in names])


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files as given, and the image files inside given folders (sorted, not recursive)."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            paths.append(path)
        else:
            raise AttrclfError(f"'{item}': no such image file or folder")
    if not paths:
        raise AttrclfError(f"no images found in: {', '.join(inputs)}")
    return paths


# ---------------------------------------------------------------- decoding in workers


class DecodeDataset(torch.utils.data.Dataset):
    """(index, name, (C, H, W) tensor or None, reason or None) per image; decoding errors are returned, not raised."""

    def __init__(self, sources, preprocess):
        self.sources, self.preprocess = sources, preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        name, source = self.sources.item(index)
        try:
            return index, name, self.preprocess(source), None
        except DECODE_ERRORS as e:
            return index, name, None, f"cannot read image: {e}"


@dataclass
class Batch:
    """A decoded batch in input order: every image's (name, reason or None), and the readable ones' pixels."""

    items: list[tuple[str, str | None]]
    pixels: torch.Tensor | None  # (B_readable, C, H, W)


def collate(items) -> Batch:
    tensors = [tensor for _, _, tensor, _ in items if tensor is not None]
    return Batch([(name, reason) for _, name, _, reason in items], torch.stack(tensors) if tensors else None)


def one_thread(_worker_id: int) -> None:
    """Decode workers leave the cores' threads to the model."""
    torch.set_num_threads(1)


def batches(sources, preprocess, *, batch_size: int, workers: int):
    """Decoded batches in input order."""
    loader = torch.utils.data.DataLoader(
        DecodeDataset(sources, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate, worker_init_fn=one_thread if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader


def default_workers(count: int, batch_size: int) -> int:
    """Decode workers: none for a handful of images (starting workers costs more), else up to 4 (one per core)."""
    return 0 if count < 2 * batch_size else min(4, os.cpu_count() or 1)


# ---------------------------------------------------------------- results


@dataclass
class Prediction:
    """One image's result."""

    image: str
    probs: np.ndarray  # (A,) probabilities, the model's attribute order
    present: list[str]


@dataclass
class Summary:
    """What a bulk run did."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    seconds: float = 0.0
    output: str | None = None
    processes: int = 1

    @property
    def images_per_second(self) -> float:
        return (self.written + len(self.skipped)) / self.seconds if self.seconds else 0.0


def iter_results(predictor, sources, *, threshold: float | None = None, batch_size: int = 32,
                 workers: int | None = None):
    """Yield, in input order, Prediction per readable image and (image, reason) per unreadable one."""
    thresholds = np.asarray(predictor.thresholds(threshold))
    names = predictor.label_names
    workers = default_workers(len(sources), batch_size) if workers is None else workers
    for batch in batches(sources, predictor.preprocessor, batch_size=batch_size, workers=workers):
        probs = iter(predictor.batch_probs(batch.pixels).cpu().numpy()) if batch.pixels is not None else None
        for name, reason in batch.items:
            if reason is not None:
                yield name, reason
                continue
            p = next(probs)
            yield Prediction(name, p, [n for n, keep in zip(names, p >= thresholds, strict=True) if keep])


class Writer:
    """Rows streamed to a CSV, JSONL or Parquet file (by its extension)."""

    def __init__(self, path: Path, label_names: list[str], kind: str):
        self.label_names, self.kind = label_names, kind
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("image", pa.string()), *[(n, pa.float32()) for n in label_names],
                                     ("present", pa.list_(pa.string()))])
            self.file = pq.ParquetWriter(str(path), self.schema)
            return
        self.file = open(path, "w", newline="", encoding="utf-8")
        if kind == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["image", *label_names, "present"])

    def write(self, rows: list[Prediction]) -> None:
        if not rows:
            return
        if self.kind == "parquet":
            import pyarrow as pa

            columns = {"image": [r.image for r in rows], "present": [r.present for r in rows]}
            matrix = np.stack([r.probs for r in rows]).astype(np.float32)
            columns |= {n: matrix[:, a] for a, n in enumerate(self.label_names)}
            self.file.write_table(pa.table(columns, schema=self.schema))
        elif self.kind == "csv":
            self.csv.writerows([r.image, *(f"{p:.6f}" for p in r.probs), ";".join(r.present)] for r in rows)
        else:
            self.file.writelines(json.dumps({"image": r.image, "probabilities": dict(zip(
                self.label_names, map(float, r.probs), strict=True)), "present": r.present}) + "\n" for r in rows)
        if self.kind != "parquet":
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def output_kind(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ModuleNotFoundError:
            raise AttrclfError("--output .parquet needs pyarrow (pip install pyarrow); or write .csv / .jsonl"
                               ) from None
    if suffix not in FORMATS:
        raise AttrclfError(f"--output '{path}': choose a file ending in {', '.join(FORMATS)} (the format follows it)")
    folder = Path(path).parent
    if not folder.is_dir():
        raise AttrclfError(f"--output '{path}': folder '{folder}' does not exist")
    return FORMATS[suffix]


def progress_bar(total: int, description: str):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=description, unit="img", dynamic_ncols=True, mininterval=0.5 if interactive else 30,
                leave=interactive)


def write_predictions(predictor, sources, path: Path, *, threshold=None, batch_size: int = 32,
                      workers: int | None = None, show_progress: bool = True, description: str = "predict") -> Summary:
    """Stream the predictions of `sources` to `path` (written under a temporary name, renamed when complete)."""
    kind = output_kind(path)
    summary, start = Summary(output=str(path)), time.perf_counter()
    bar = progress_bar(len(sources), description) if show_progress else None
    with atomic_path(path) as temporary:
        writer, pending = Writer(temporary, predictor.label_names, kind), []
        try:
            for result in iter_results(predictor, sources, threshold=threshold, batch_size=batch_size,
                                       workers=workers):
                if isinstance(result, Prediction):
                    pending.append(result)
                else:
                    summary.skipped.append(result)
                    print(f"skipped {result[0]}: {result[1]}", file=sys.stderr)
                if len(pending) >= batch_size:
                    writer.write(pending)
                    summary.written += len(pending)
                    bar and bar.update(len(pending))
                    pending = []
            writer.write(pending)
            summary.written += len(pending)
        finally:
            writer.close()
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------- several processes (accelerate launch)


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def part_path(path: Path, rank: int, size: int) -> Path:
    return path.with_name(f".{path.name}.part-{rank}-of-{size}{path.suffix}")


def merge_parts(path: Path, parts: list[Path], kind: str) -> None:
    """Concatenate the ranks' part files (rank order = input order) into `path`, streaming; then remove them."""
    with atomic_path(path) as temporary:
        if kind == "parquet":
            import pyarrow.parquet as pq

            writer = None
            for part in parts:
                source = pq.ParquetFile(str(part))
                writer = writer or pq.ParquetWriter(str(temporary), source.schema_arrow)
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group))
            writer.close()
        else:
            with open(temporary, "wb") as out:
                for rank, part in enumerate(parts):
                    with open(part, "rb") as file:
                        if kind == "csv" and rank:
                            file.readline()  # the header, written once
                        while block := file.read(1 << 20):
                            out.write(block)
    for part in parts:
        part.unlink()


def distributed_predict(predictor_factory, sources, path: Path, *, show_progress: bool = True,
                        **options) -> Summary | None:
    """Each rank predicts its contiguous share into a part file; rank 0 merges them. Rank 0 returns the Summary of
    the whole run (every rank's skipped images), the others None."""
    from accelerate import PartialState  # only under a launcher with several processes

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)  # on CPU, gloo (as AcceleratorState decides it)
    rank, size = state.process_index, state.num_processes
    kind = output_kind(path)
    share = Share(sources, len(sources) * rank // size, len(sources) * (rank + 1) // size)
    predictor = predictor_factory(state.device)
    summary = write_predictions(predictor, share, part_path(path, rank, size),
                                show_progress=show_progress and state.is_main_process,
                                description=f"predict (rank 0 of {size})", **options)
    skipped_file = part_path(path, rank, size).with_suffix(".skipped.json")
    skipped_file.write_text(json.dumps({"written": summary.written, "skipped": summary.skipped}))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merge_parts(path, [part_path(path, r, size) for r in range(size)], kind)
    total = Summary(output=str(path), seconds=summary.seconds, processes=size)
    for r in range(size):
        record_file = part_path(path, r, size).with_suffix(".skipped.json")
        record = json.loads(record_file.read_text())
        record_file.unlink()
        total.written += record["written"]
        total.skipped += [tuple(item) for item in record["skipped"]]
    return total
