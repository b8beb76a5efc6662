"""What every benchmark shares: the machine description, the emoji split, result files and table printing."""

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA = Path("benchmarks/data")
EMOJI = DATA / "emoji"
WEIGHTS = DATA / "mobilenetv2_100.safetensors"
RESULTS = Path("benchmarks/results")
GROUP_COLUMN = "base_emoji"


def machine() -> dict:
    """CPU, cores, GPU and library versions, and the load when the run started (others may share the machine)."""
    info = {"cpu": torch.cpu.get_capabilities().get("cpu_name") or platform.processor(),
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": bool(torch.cpu.get_capabilities().get("amx_bf16")
                                    or torch.cpu.get_capabilities().get("avx512_bf16")),
            "load_average_at_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    """benchmarks/results/NAME.json, written under a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, partial = out_dir / f"{name}.json", out_dir / f".{name}.json.partial"
    partial.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    os.replace(partial, path)
    return path


def subset_labels(data_dir: Path, out_file: Path, limit_groups: int | None, seed: int = 0) -> Path:
    """labels.txt keeping all images of `limit_groups` randomly chosen base emoji (all of them when None)."""
    lines = (data_dir / "labels.txt").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    if limit_groups:
        groups = sorted({row.split()[-1] for row in rows})
        keep = set(np.random.default_rng(seed).permutation(groups)[:limit_groups])
        rows = [row for row in rows if row.split()[-1] in keep]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join([header, *rows]) + "\n")
    return out_file


def table(rows: list[list], header: list[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------- labelled sets with a group column (bench_quality)

TABLER = DATA / "tabler"
DATASETS = {"emoji": (EMOJI, "base_emoji"), "tabler": (TABLER, "base_icon")}  # name -> (folder, group column)


@dataclass
class LabelTable:
    """A labels.txt whose last column is the group: header tokens and rows of tokens (image, labels..., group)."""

    header: list[str]
    rows: list[list[str]]

    @classmethod
    def read(cls, path: Path) -> "LabelTable":
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return cls(lines[0], lines[1:])

    @property
    def label_names(self) -> list[str]:
        return self.header[1:-1]

    def select(self, names: set[str]) -> "LabelTable":
        return LabelTable(self.header, [row for row in self.rows if row[0] in names])

    def groups(self) -> list[str]:
        return [row[-1] for row in self.rows]

    def names(self) -> list[str]:
        return [row[0] for row in self.rows]

    def targets(self) -> np.ndarray:
        """(N, A) int: 1, 0, or -1 for NA."""
        return np.array([[-1 if v == "NA" else int(v) for v in row[1:-1]] for row in self.rows], dtype=np.int64)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(" ".join(tokens) for tokens in [self.header, *self.rows]) + "\n")
        return path


def grouped_split(groups: list[str], fraction: float, seed: int) -> np.ndarray:
    """Rows (bool) of the held-out side: groups in seeded random order until `fraction` of the rows is taken.

    The same rule as train.py's split by --group-column (attrclf's split_by_group, copied rather than imported so that
    the benchmark holds no attrclf internals): bench_quality checks each run's validation counts in metrics.json
    against this, so a change in attrclf's rule shows up as a failed check instead of an unfair comparison.
    """
    unique, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    held_out, taken = np.zeros(len(unique), dtype=bool), 0
    for g in np.random.default_rng(seed).permutation(len(unique)):
        if taken >= fraction * len(groups):
            break
        held_out[g], taken = True, taken + sizes[g]
    return held_out[inverse]


def hide_training_labels(labels: LabelTable, validation: set[str], fraction: float, seed: int) -> LabelTable:
    """A copy with `fraction` of the known labels of the non-validation rows set to NA (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in labels.rows:
        row = list(row)
        if row[0] not in validation:
            for i in range(1, len(row) - 1):  # the last column is the group
                if row[i] != "NA" and rng.random() < fraction:
                    row[i] = "NA"
        rows.append(row)
    return LabelTable(labels.header, rows)


def write_labelled_images(entries: list[dict], out_dir: Path, *, label_names: list[str], group_column: str,
                          render) -> None:
    """out_dir/labels.txt (the group as last column) + images/ + images/metadata.jsonl, built in a temporary folder and
    renamed into place. Each entry has "name", "labels" (1 / 0 / None per label name), "base" (its group) and what
    `render(entry)` turns into the PIL image saved under images/NAME."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    lines, records = [" ".join(["image_name", *label_names, group_column])], []
    for entry in entries:
        render(entry).save(staging / "images" / entry["name"])
        values = ["NA" if v is None else str(v) for v in entry["labels"]]
        lines.append(" ".join([entry["name"], *values, entry["base"]]))
        records.append(json.dumps({"file_name": entry["name"], **dict(zip(label_names, entry["labels"], strict=True)),
                                   group_column: entry["base"]}))
    (staging / "labels.txt").write_text("\n".join(lines) + "\n")
    (staging / "images" / "metadata.jsonl").write_text("\n".join(records) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def label_count_table(entries: list[dict], label_names: list[str]) -> str:
    """Per attribute the count of 1 / 0 / NA (None) among the entries' "labels"; then images, groups ("base") and the
    share of NA."""
    lines = [f"{'attribute':<10} {'1':>6} {'0':>6} {'NA':>6}"]
    for a, name in enumerate(label_names):
        values = [e["labels"][a] for e in entries]
        lines.append(f"{name:<10} {values.count(1):>6} {values.count(0):>6} {values.count(None):>6}")
    total = len(entries) * len(label_names)
    na = sum(v is None for e in entries for v in e["labels"])
    lines.append(f"{len(entries)} images in {len({e['base'] for e in entries})} groups; "
                 f"{na} of {total} labels NA ({na / total:.0%})")
    return "\n".join(lines)

