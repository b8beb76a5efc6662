"""Streaming training data: shards read as a `datasets` IterableDataset, a held-out validation split, the loader.

Used when --data names shards (attrclf.shards: WebDataset tar or Parquet, local or fsspec) or with --streaming (a Hub
dataset id, or a local dataset folder, whose data files are shards). The length is unknown, so the run is step-based:
--max-steps in total, validation every --eval-every steps (one "epoch" of the loop, its schedule, checkpoints and
early stopping is --eval-every steps).

- Validation is materialised once: the rows of --val-data, or else the first --val-rows rows of the shard list in
  order (shard 0 from its first row on, then shard 1, ...). Those rows are skipped by the training stream, so they are
  never trained on.
- pos_weight comes from the first --stats-rows training rows (the stream cannot be counted without a whole pass).
- The training stream: `IterableDataset.from_generator` over the shards (one shard per data source),
  `datasets.distributed.split_dataset_by_node` (whole shards per process when their number divides the world size,
  else every process reads all of them and keeps every world-size-th row), a bounded shuffle buffer (--shuffle-buffer,
  which also shuffles the shard order), and `set_epoch(pass)` for each new pass. It is iterated in the training
  process (reading bytes and labels only); decoding and augmentation run in a pool of --num-workers processes, each
  batch seeded from (--seed, batch number, process), at most 2 x workers batches ahead.
- Resume: the stream's `state_dict()` (shard index + row offset, per process) as of the last batch trained on goes
  into the checkpoint's training_state.json; the rows that sat in the shuffle buffer at that moment are not seen again
  in that pass (at most --shuffle-buffer per process).
- A bad row (a label that is not 1 / 0 / NA, a missing attribute or labels file) stops the run with one line naming
  its shard and row; an image that fails to decode is left out of its batch and counted, as for files.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import AttrclfError
from .labels import parse_label_at
from .shards import looks_like_shards, read_shard, resolve_shards, shard_name
from .sources import AttrData


@dataclass
class StreamSpec:
    """What the training stream reads: the shards, the attributes, and the rows held out for validation."""

    shards: list[str]  # every shard, in name order (index = position)
    train_shards: list[int]  # indices of the shards the training stream reads
    label_names: list[str]
    held: dict[int, int] = field(default_factory=dict)  # shard index -> its first rows held out for validation
    label_columns: list[str] | None = None
    group_column: str | None = None


@dataclass
class StreamData(AttrData):
    """AttrData whose `train` is only the --stats-rows sample (label counts, pos_weight); `stream` is the real thing."""

    stream: StreamSpec | None = None


def shard_urls(data: str, streaming: bool) -> list[str]:
    """The shards of --data: a path / glob / folder of shards, or (with --streaming) a dataset's data files."""
    if looks_like_shards(data):
        return resolve_shards(data)
    import datasets

    try:
        builder = datasets.load_dataset_builder(data)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise AttrclfError(f"--data '{data}' --streaming: not a reachable dataset ({type(e).__name__}: {e})") from e
    files = (builder.config.data_files or {}).get("train") or []
    urls = [str(f) for f in files if str(f).endswith((".tar", ".parquet"))]
    if not urls:
        raise AttrclfError(f"--data '{data}' --streaming: its train split has no .tar or .parquet data files; "
                           f"write shards with `attrclf shard`, or train without --streaming")
    return sorted(urls)


def stream_rows(urls: list[str], indices: list[int], *, label_names: list[str], held: dict[int, int],
                label_columns: list[str] | None = None, group_column: str | None = None):
    """Rows of the given shards in order, skipping each shard's held-out first rows; a bad row carries `error`.

    The generator of the IterableDataset: `datasets` hands each data source (one shard) its own call.
    """
    for url, index in zip(urls, indices, strict=True):
        for row, sample in enumerate(read_shard(url, label_columns, group_column)):
            if row < held.get(index, 0):
                continue
            yield parse_row(sample, index=index, url=url, row=row, label_names=label_names)


def parse_row(sample, *, index: int, url: str, row: int, label_names: list[str]) -> dict:
    """A shard row -> {image (bytes), image_name, labels (1 / 0 / None), group, shard, row, error (None if good)}."""
    where = f"{shard_name(url)} row {row} (key {sample.key})"
    out = {"image": sample.image, "image_name": f"{shard_name(url)}/{sample.key}", "labels": [None] * len(label_names),
           "group": sample.group or f"{shard_name(url)}/{sample.key}", "shard": index, "row": row, "error": None}
    try:
        if "__error__" in sample.labels:
            raise AttrclfError(f"{where}: {sample.labels['__error__']}")
        missing = [name for name in label_names if name not in sample.labels]
        if missing:
            raise AttrclfError(f"{where}: no label for attribute(s) {', '.join(missing)}")
        if sample.image is None:
            raise AttrclfError(f"{where}: no image in the sample")
        out["labels"] = [parse_label_at(sample.labels[name], where, name) for name in label_names]
    except AttrclfError as e:
        out["error"] = str(e)
    return out


STREAM_FEATURES = None  # built on first use (datasets is imported lazily)


def stream_features():
    from datasets import Features, List, Value

    global STREAM_FEATURES
    if STREAM_FEATURES is None:
        STREAM_FEATURES = Features({"image": Value("binary"), "image_name": Value("string"),
                                    "labels": List(Value("int8")), "group": Value("string"), "shard": Value("int32"),
                                    "row": Value("int64"), "error": Value("string")})
    return STREAM_FEATURES


def training_stream(spec: StreamSpec, *, rank: int, world_size: int, seed: int, shuffle_buffer: int):
    """This process's share of the training rows as a `datasets` IterableDataset (see the module docstring)."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    kwargs = {"urls": [spec.shards[i] for i in spec.train_shards], "indices": list(spec.train_shards),
              "label_names": tuple(spec.label_names), "held": spec.held,  # lists are data sources; tuples not
              "label_columns": tuple(spec.label_columns) if spec.label_columns else None,
              "group_column": spec.group_column}
    ds = IterableDataset.from_generator(stream_rows, gen_kwargs=kwargs, features=stream_features())
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if shuffle_buffer > 1:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return ds


# ---------------------------------------------------------------- preparing the data


def first_rows(spec: StreamSpec, shard_indices: list[int], count: int, held: dict[int, int] | None = None):
    """The first `count` good rows of these shards in order (a bad one stops the run, naming it), and how many rows
    of each shard were read: {shard index: rows}."""
    rows, taken = [], {}
    for index in shard_indices:
        if len(rows) >= count:
            break
        for row in stream_rows([spec.shards[index]], [index], label_names=spec.label_names, held=held or {},
                               label_columns=spec.label_columns, group_column=spec.group_column):
            if row["error"]:
                raise AttrclfError(row["error"])
            rows.append(row)
            taken[index] = row["row"] + 1
            if len(rows) >= count:
                break
    return rows, taken


def first_label_names(url: str, label_columns: list[str] | None, group_column: str | None) -> list[str]:
    """--label-columns, or the attributes of the first row of the first shard, in its order."""
    if label_columns:
        return list(label_columns)
    for sample in read_shard(url, None, group_column):
        names = [n for n in sample.labels if n != "__error__"]
        if not names:
            raise AttrclfError(f"{shard_name(url)} row 0: {sample.labels.get('__error__', 'no attributes')}")
        return names
    raise AttrclfError(f"{shard_name(url)}: the shard is empty")


def rows_to_split(rows: list[dict]):
    """Stream rows -> a `datasets.Dataset` in sources.FEATURES' schema (images kept as encoded bytes)."""
    from datasets import Dataset

    from .sources import FEATURES

    return Dataset.from_dict({"image": [{"bytes": r["image"], "path": None} for r in rows],
                              "image_name": [r["image_name"] for r in rows], "labels": [r["labels"] for r in rows],
                              "group": [r["group"] for r in rows]}, features=FEATURES)


def prepare_stream(cfg) -> StreamData:
    """The shards of --data, the validation split materialised once, the --stats-rows sample; checked up front."""
    from .images import drop_unreadable

    urls = shard_urls(cfg.data, cfg.streaming)
    names = first_label_names(urls[0], cfg.label_columns, cfg.group_column)
    spec = StreamSpec(urls, list(range(len(urls))), names, label_columns=cfg.label_columns,
                      group_column=cfg.group_column)
    if cfg.val_data:
        validation, split = external_validation(cfg, names), f"--val-data {cfg.val_data}"
    else:
        rows, taken = first_rows(spec, spec.train_shards, cfg.val_rows)
        complete = set(list(taken)[:-1])  # shards read to their end; the last one may go on
        last = list(taken)[-1]
        if len(rows) < cfg.val_rows:
            raise AttrclfError(f"--data '{cfg.data}': {len(rows)} rows in all, fewer than --val-rows {cfg.val_rows}")
        spec.held = {i: n for i, n in taken.items() if i not in complete}
        spec.held[last] = taken[last]
        spec.train_shards = [i for i in spec.train_shards if i not in complete]
        validation = rows_to_split(rows)
        split = (f"the first {cfg.val_rows} rows of the shards in name order held out for validation "
                 f"({shard_name(urls[0])} row 0 to {shard_name(urls[last])} row {taken[last] - 1})")
    validation, skipped = drop_unreadable(validation)
    sample, _ = first_rows(spec, spec.train_shards, cfg.stats_rows, held=spec.held)
    if len(sample) < 2:
        raise AttrclfError(f"--data '{cfg.data}': fewer than 2 training rows left after the validation rows")
    train = rows_to_split(sample)
    return StreamData(train, validation, names, f"{len(urls)} shard(s) {cfg.data}", split, skipped,
                      stream=spec)


def external_validation(cfg, names: list[str]):
    """--val-data: shards (read whole) or any source attrclf reads, with the same attributes."""
    if looks_like_shards(cfg.val_data):
        urls = resolve_shards(cfg.val_data)
        spec = StreamSpec(urls, list(range(len(urls))), names, label_columns=cfg.label_columns,
                          group_column=cfg.group_column)
        rows, _ = first_rows(spec, spec.train_shards, math.inf)
        return rows_to_split(rows)
    from datasets import concatenate_datasets

    from .sources import load_source

    source = load_source(cfg.val_data, label_columns=names, group_column=cfg.group_column)
    if source.label_names != names:
        raise AttrclfError(f"--val-data '{cfg.val_data}': attributes {source.label_names} differ from the "
                           f"shards' {names}")
    return concatenate_datasets(list(source.splits.values()))


def describe_stream(metrics: dict, data: StreamData, cfg, steps: int, world_size: int) -> None:
    """metrics.json's "data" for a streamed run: what the stream was, and that the counts are the sample's."""
    spec = data.stream
    metrics["data"]["train_images"] = steps * cfg.batch_size * world_size  # rows trained on (a stream is not counted)
    metrics["data"]["streaming"] = {
        "shards": len(spec.shards), "train_shards": len(spec.train_shards), "held_out_rows": dict(spec.held),
        "rows_trained": steps * cfg.batch_size * world_size, "shuffle_buffer": cfg.shuffle_buffer,
        "stats_rows": len(data.train), "train_counts_from": f"the first {len(data.train)} training rows",
    }


# ---------------------------------------------------------------- the loader


class StreamFailures:
    """Images of the stream that failed to decode since the last `take` (the loop's DecodeFailures for a stream)."""

    def __init__(self):
        self.names: list[str] = []

    def take(self) -> list[str]:
        taken, self.names = self.names, []
        return taken


_TRANSFORM = None  # the decode pool's transform, set once per worker process


def _set_transform(transform) -> None:
    global _TRANSFORM
    _TRANSFORM = transform


def decode_batch(rows: list[dict], seed: int, channels_last: bool, transform=None):
    """Decode and augment one batch, seeded: -> ((pixel_values, targets, mask), names of images that failed)."""
    from .loader import BatchTransform, collate

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    batch = {"image": [{"bytes": r["image"], "path": None} for r in rows],
             "image_name": [r["image_name"] for r in rows], "labels": [r["labels"] for r in rows]}
    decoded = BatchTransform(transform or _TRANSFORM)(batch)
    failed = [n for n, p in zip(batch["image_name"], decoded["pixel_values"], strict=True) if p is None]
    items = [{"pixel_values": p, "labels": labels} for p, labels in zip(*decoded.values(), strict=True)]
    return collate(items, channels_last=channels_last), failed


class StreamLoader:
    """The training loader of a stream: `len()` is --eval-every steps; each iteration goes on where the last stopped,
    into the next pass when one ends, so every process takes the same number of steps.

    Not a DataLoader on purpose: `accelerator.prepare` leaves it alone (it would shard the stream a second time);
    batches are moved to `device` here.
    """

    def __init__(self, spec: StreamSpec, transform, *, batch_size: int, steps: int, workers: int, seed: int,
                 rank: int, world_size: int, shuffle_buffer: int, device, channels_last: bool = False):
        self.spec, self.transform, self.batch_size, self.steps = spec, transform, batch_size, steps
        self.workers, self.seed, self.rank, self.device, self.channels_last = workers, seed, rank, device, channels_last
        self.dataset = training_stream(spec, rank=rank, world_size=world_size, seed=seed,
                                       shuffle_buffer=shuffle_buffer)
        self.generator = torch.Generator()  # the loop re-seeds a loader's generator each epoch; batches seed themselves
        self.failures = StreamFailures()
        self.passes, self.batches = 0, 0  # passes begun over this process's rows; batches drawn
        self.state = self._state()  # as of the last batch handed to training
        self._rows, self._pool, self._pending = None, None, deque()

    def __len__(self) -> int:
        return self.steps

    def _state(self) -> dict:
        return {"passes": self.passes, "batches": self.batches, "dataset": self.dataset.state_dict()}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.passes, self.batches = state["passes"], state["batches"]
        self.dataset.set_epoch(self.passes)
        self.dataset.load_state_dict(state["dataset"])
        self.state = dict(state)

    def rows(self):
        """This process's training rows forever, pass after pass: (pass, row)."""
        empty_passes = 0
        try:
            while True:
                if self._rows is None:
                    self.dataset.set_epoch(self.passes)
                    self._rows = iter(self.dataset)
                empty = True
                for row in self._rows:
                    empty = False
                    yield self.passes, row
                self._rows, self.passes = None, self.passes + 1
                empty_passes = empty_passes + 1 if empty else 0
                if empty_passes == 2:  # (one may be a resume at the very end of a pass)
                    raise AttrclfError(f"process {self.rank} has no training rows in its shards; give at least as "
                                       f"many training shards as processes")
        finally:
            self._close_rows()

    def _close_rows(self) -> None:
        """Close the datasets iterator of the pass under way, here and now. Left to the garbage collector, its
        finaliser (which shuts a thread pool down and joins it) can run inside another thread's start and deadlock
        CPython 3.11's threading (seen as a hung test)."""
        rows, self._rows = self._rows, None
        if rows is not None and hasattr(rows, "close"):
            rows.close()

    def _draw(self, rows) -> tuple:
        """The next batch's rows pulled from the stream, its seed, and the stream state right after them."""
        batch = []
        for _, row in rows:
            if row["error"]:
                raise AttrclfError(row["error"])
            batch.append(row)
            if len(batch) == self.batch_size:
                break
        seed = int(np.random.SeedSequence([self.seed, self.batches, self.rank]).generate_state(1)[0])
        self.batches += 1
        return batch, seed, self._state()

    def __iter__(self):
        if self._rows is None or not hasattr(self, "_row_iter"):
            self._row_iter = self.rows()
        if self.workers and self._pool is None:
            import multiprocessing

            self._pool = multiprocessing.get_context("fork").Pool(self.workers, _set_transform, (self.transform,))
        for _ in range(self.steps):
            while len(self._pending) < max(1, 2 * self.workers):
                batch, seed, state = self._draw(self._row_iter)
                job = (self._pool.apply_async(decode_batch, (batch, seed, self.channels_last)) if self._pool else
                       decode_batch(batch, seed, self.channels_last, self.transform))
                self._pending.append((job, state))
            job, self.state = self._pending.popleft()
            (pixel_values, targets, mask), failed = job.get() if self._pool else job
            self.failures.names += failed
            yield (pixel_values.to(self.device, non_blocking=True), targets.to(self.device), mask.to(self.device))

    def close(self) -> None:
        """Stop the decode pool, close the stream's iterators and forget batches drawn ahead (a resume re-reads from
        `state`)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
        self._pending.clear()
        if hasattr(self, "_row_iter"):
            self._row_iter.close()  # runs rows()'s `finally`, which closes the datasets iterator
            del self._row_iter
        self._close_rows()


def gather_states(loader: StreamLoader, accelerator) -> list[dict]:
    """Every process's stream state, in process order (for the checkpoint)."""
    from accelerate.utils import gather_object

    state = loader.state_dict()
    return gather_object([state]) if accelerator.num_processes > 1 else [state]


def restore_state(loader: StreamLoader, states: list[dict] | None, accelerator) -> None:
    """Put this process's stream state back from a checkpoint's list."""
    if states:
        loader.load_state_dict(states[accelerator.process_index])


def stream_loader(data: StreamData, transform, cfg, accelerator) -> StreamLoader:
    """The training loader of a streamed run, this process's share of the shards."""
    return StreamLoader(data.stream, transform, batch_size=cfg.batch_size, steps=cfg.eval_every,
                        workers=cfg.num_workers, seed=cfg.seed, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, shuffle_buffer=cfg.shuffle_buffer,
                        device=accelerator.device, channels_last=cfg.channels_last)
