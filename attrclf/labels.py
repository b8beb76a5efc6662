"""Label values and label statistics: 1 / 0 / NA tokens, the labels.txt reader, column checks, counts and pos_weight.

A label is 1, 0 or None (NA, unknown) in data; every reader parses values with `parse_label` and reports a bad one
with `parse_label_at` (file, line and attribute named). `LabelCounts` holds the positives, negatives and NA of each
attribute; training derives pos_weight from the training split's counts (`compute_pos_weight`).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import AttrclfError

NA_TOKENS = {"na", "n/a", "nan", "null", "none", "-1", ""}
POSITIVE_TOKENS = {"1", "1.0", "true"}
NEGATIVE_TOKENS = {"0", "0.0", "false"}


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


def parse_label_at(value, where: str, attribute: str) -> int | None:
    """parse_label; a bad value is an AttrclfError that names `where` (file and line) and the attribute."""
    try:
        return parse_label(value)
    except ValueError:
        raise AttrclfError(f"{where}: value '{value}' for attribute '{attribute}' is not 0, 1 or NA") from None


# ---------------------------------------------------------------- labels.txt


def read_labels_file(path: Path, group_column: str | None = None) -> tuple[list[str], list[dict]]:
    """Parse a whitespace-separated labels file: image name, then 1 / 0 / NA per attribute; optional header.

    The first line is a header when its values are not all labels; without one the attributes are Attr1, Attr2, ...

    Returns:
        (label_names, rows) where each row is {"image_name", "labels", "group", "line"}.
    """
    lines = _data_lines(path)
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
            parse_label_at(value, f"{path.name} line {number}", name)
            for i, (value, name) in enumerate(zip(values, names, strict=True))
            if i != group_index
        ]
        rows.append({"image_name": image_name, "labels": labels, "group": group, "line": number})
    label_names = [name for i, name in enumerate(names) if i != group_index]
    return label_names, rows


def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of every line that is neither blank nor a # comment; at least one."""
    if not path.is_file():
        raise AttrclfError(f"labels file '{path}' does not exist (pass --labels FILE or put labels.txt in --data)")
    lines = [
        (number, text.split())
        for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1)
        if text.strip() and not text.lstrip().startswith("#")
    ]
    if not lines:
        raise AttrclfError(f"{path.name}: no data rows (the file is empty)")
    return lines


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


def _group_index(file_name: str, names: list[str], group_column: str | None) -> int | None:
    if group_column is None:
        return None
    check_group_column(group_column, names, file_name)
    return names.index(group_column)


# ---------------------------------------------------------------- choosing columns


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


def check_group_column(group_column: str | None, columns: list[str], where: str) -> None:
    """--group-column, when given, must name a column of the source."""
    if group_column is not None and group_column not in columns:
        raise AttrclfError(
            f"--group-column: '{group_column}' is not a column of {where} (columns: {', '.join(columns)})"
        )


def select_columns(label_names: list[str], rows: list[dict], label_columns: list[str] | None, where: str):
    """Keep only `label_columns` (in that order); rows are changed in place. Returns (label_names, rows)."""
    if not label_columns:
        return label_names, rows
    check_label_columns(label_columns, label_names, where)
    index = [label_names.index(c) for c in label_columns]
    for row in rows:
        row["labels"] = [row["labels"][i] for i in index]
    return list(label_columns), rows


# ---------------------------------------------------------------- counts and pos_weight


@dataclass
class LabelCounts:
    """Per attribute, in label order: how many images are known positive, known negative, and NA."""

    positive: list[int]
    negative: list[int]
    na: list[int]

    @property
    def known(self) -> list[int]:
        """Known labels (positive + negative) per attribute."""
        return [p + n for p, n in zip(self.positive, self.negative, strict=True)]

    def by_attribute(self, label_names: list[str]) -> dict[str, dict[str, int]]:
        """{name: {"positive", "negative", "na"}}: the form of metrics.json's train_counts and validation_counts."""
        return {name: {"positive": p, "negative": n, "na": na}
                for name, p, n, na in zip(label_names, self.positive, self.negative, self.na, strict=True)}


def label_counts(labels: list[list[int | None]], num_labels: int) -> LabelCounts:
    """Positives, negatives and NA per attribute of (N, A) labels (1 / 0 / None)."""
    array = np.array([[np.nan if v is None else v for v in row] for row in labels], dtype=np.float64)
    array = array.reshape(-1, num_labels)
    return LabelCounts(positive=(array == 1).sum(0).tolist(), negative=(array == 0).sum(0).tolist(),
                       na=np.isnan(array).sum(0).tolist())


def training_counts(labels: list[list[int | None]], num_labels: int, policy: str = "ignore") -> LabelCounts:
    """label_counts as the training loss sees them: under --na-policy negative, NA counts as a negative."""
    counts = label_counts(labels, num_labels)
    if policy == "negative":
        return LabelCounts(positive=counts.positive, na=[0] * num_labels,
                           negative=[n + na for n, na in zip(counts.negative, counts.na, strict=True)])
    return counts


def compute_pos_weight(counts: LabelCounts, label_names: list[str],
                       cap: float = 50.0) -> tuple[torch.Tensor, list[str]]:
    """negatives / positives per attribute, from known labels only, clamped to [1/cap, cap].

    Returns:
        (A,) pos_weight and warnings for attributes whose weight could not be counted.
    """
    weights, warnings = [], []
    for name, pos, neg in zip(label_names, counts.positive, counts.negative, strict=True):
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
