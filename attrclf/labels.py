"""Label values and label statistics: 1 / 0 / NA tokens, the labels.txt reader, column checks, counts and pos_weight.

A label is 1, 0 or None (NA, unknown) in data; every reader parses values with `parse_label` and reports a bad one
with `parse_label_at` (file, line and attribute named). `LabelCounts` holds the positives, negatives and NA of each
attribute; training derives pos_weight from the training split's counts (`compute_pos_weight`).
"""

import codecs
import math
import re
import shlex
from collections import Counter
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


def read_labels_file(path: Path, group_column: str | None = None, *, images_dir: Path | None = None,
                     header: bool | None = None, encoding: str | None = None) -> tuple[list[str], list[dict]]:
    """Parse a whitespace-separated labels file: image name, then 1 / 0 / NA per attribute; optional header.

    A cell with spaces is written in double quotes ("my photo.jpg"). Whether the first row is a header is decided by
    evidence (`first_row_is_header`), never by guessing: a row is never dropped as a header by mistake.

    Args:
        path: The labels file.
        group_column: A header column that is not an attribute (--group-column).
        images_dir: The images folder; the reader looks there to tell an image row from a header.
        header: True / False force the first row to be a header / data (--header, --no-header); None decides.
        encoding: The file's text encoding (--labels-encoding); default UTF-8, with or without BOM.

    Returns:
        (label_names, rows) where each row is {"image_name", "labels", "group", "line"}.
    """
    lines = _data_lines(path, encoding)
    rest_width = _common_width(lines[1:]) if len(lines) > 1 else len(lines[0][2])
    has_header = header if header is not None else first_row_is_header(lines[0], rest_width, images_dir, path.name)
    header_line = lines[0] if has_header else None
    lines = lines[1:] if has_header else lines
    if not lines:
        raise AttrclfError(f"{path.name}: only a header line, no data rows")
    width = _common_width(lines) - 1
    if width < 1:
        raise AttrclfError(f"{path.name} line {lines[0][0]}: only an image name, no label values after it")
    names = _header_names(path.name, header_line, width) if header_line else [f"Attr{i + 1}" for i in range(width)]
    group_index = _group_index(path.name, names, group_column)
    rows, seen = [], {}
    for number, text, tokens in lines:
        _check_width(f"{path.name} line {number}", text, tokens, width, images_dir)
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


def read_text(path: Path, encoding: str | None = None) -> str:
    """A text file's contents, UTF-8 with or without BOM unless `encoding` names another; else one clear error.

    Binary files (a NUL byte), UTF-16 files and bytes that are not UTF-8 each get a line that names the file, the
    byte and its offset, and --labels-encoding.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AttrclfError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        codec = codecs.lookup(encoding or "utf-8-sig").name
    except LookupError:
        raise AttrclfError(f"--labels-encoding '{encoding}': not an encoding Python knows "
                           f"(for example utf-8, latin-1, cp1252, utf-16)") from None
    wide = codec.startswith(("utf-16", "utf-32"))
    if encoding is None and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise AttrclfError(f"{path.name} is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; "
                           f"save it as UTF-8 or pass --labels-encoding utf-16")
    nul = data.find(b"\x00")
    if nul >= 0 and not wide:
        raise AttrclfError(f"{path.name} looks binary (a NUL byte at offset {nul}), not a text file of labels; "
                           f"check --labels / --data")
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte 0x{data[e.start]:02x} at offset {e.start}, line {line}"
        if encoding is None:
            raise AttrclfError(f"{path.name} is not UTF-8 ({where}); if it is Latin-1, pass --labels-encoding "
                               f"latin-1 (or the file's encoding), or save it as UTF-8") from None
        raise AttrclfError(f"{path.name} is not valid {encoding} ({where}); check --labels-encoding") from None


def split_row(text: str, where: str) -> list[str]:
    """A row's cells: separated by spaces or tabs; a cell in double quotes ("my photo.jpg") may hold spaces.

    Quotes have no escapes (a backslash is an ordinary character, as in Windows paths); a name cannot hold a `"`.
    """
    if '"' not in text:
        return text.split()
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.quotes, lexer.escape, lexer.commenters = True, '"', "", ""
    try:
        return list(lexer)
    except ValueError:
        raise AttrclfError(f'{where}: a " opens a quoted name that is not closed on this line') from None


def _data_lines(path: Path, encoding: str | None) -> list[tuple[int, str, list[str]]]:
    """(line number, text, cells) of every line that is neither blank nor a # comment; at least one."""
    if path.is_dir():
        raise AttrclfError(f"labels file '{path}' is a directory; pass the labels file itself with --labels FILE")
    if not path.is_file():
        raise AttrclfError(f"labels file '{path}' does not exist (pass --labels FILE or put labels.txt in --data)")
    lines = [
        (number, text, split_row(text, f"{path.name} line {number}"))
        for number, text in enumerate(read_text(path, encoding).splitlines(), start=1)
        if text.strip() and not text.lstrip().startswith("#")
    ]
    if not lines:
        raise AttrclfError(f"{path.name}: no data rows (the file is empty)")
    return lines


def _common_width(lines: list[tuple[int, str, list[str]]]) -> int:
    """The number of cells most rows have (ties: the earliest), so one odd row is the one reported."""
    return Counter(len(tokens) for _, _, tokens in lines).most_common(1)[0][0]


def _is_label(token: str) -> bool:
    try:
        parse_label(token)
        return True
    except ValueError:
        return False


def _image_exists(images_dir: Path | None, name: str) -> bool:
    """Whether images_dir holds `name` (a file, or a directory that rows_to_dataset then reports)."""
    if images_dir is None:
        return False
    try:
        return (images_dir / name).exists()
    except (OSError, ValueError):  # a name too long for the filesystem, or one that no path can hold
        return False


def _looks_like_image_name(name: str) -> bool:
    """Whether `name` ends like an image file PIL can open (.png, .jpg, ...)."""
    from PIL import Image

    return Path(name).suffix.lower() in Image.registered_extensions()


def first_row_is_header(first: tuple[int, str, list[str]], rest_width: int, images_dir: Path | None,
                        file_name: str) -> bool:
    """Decide by evidence whether the first row names the attributes; when the evidence is not decisive, say so.

    A first cell that names a file in `images_dir` (or that does so with the next cells joined by spaces) makes the
    row data. Otherwise a row whose first cell looks like an image file name is data when some of its values are
    labels (any mistake in it is then reported, nothing is lost); a row with no label value and no image name is a
    header. A header may omit the image column's name (one cell fewer than the rows after it). Anything else -- a
    first cell that is no image but only label values after it (`image 0 1`), or a mixture -- is uncertain: an error
    that shows the row and names --header / --no-header.

    Args:
        first: (line number, text, cells) of the first row.
        rest_width: The number of cells of the rows after it.
    """
    number, text, tokens = first
    name = tokens[0]
    if _image_exists(images_dir, name) or _joined_image_name(text, len(tokens) - rest_width, images_dir):
        return False
    names_only = len(tokens) == rest_width - 1
    cells = tokens if names_only else tokens[1:]
    labels = [token for token in cells if _is_label(token)]
    where = f"not in '{images_dir}'" if images_dir is not None else "not a known image (no images folder given)"
    if _looks_like_image_name(name):
        if labels or not cells:
            return False
        reason = f"'{name}' looks like an image name but is {where}, and none of its values is 1, 0 or NA"
    elif not labels:
        return True
    elif len(labels) == len(cells):
        if len(set(cells)) < len(cells):
            return False  # repeated values cannot be attribute names
        reason = f"'{name}' is {where}, and its other values are all 1, 0 or NA"
    else:
        reason = f"'{name}' is {where}, and some of its values are labels ({', '.join(labels)}) and some not"
    raise AttrclfError(
        f"{file_name} line {number}: cannot tell whether the first row {text.strip()!r} is a header or an image's "
        f"labels ({reason}); pass --header if it names the attributes, --no-header if it is data"
    )


def _joined_image_name(text: str, extra: int, images_dir: Path | None) -> str | None:
    """When a row has `extra` cells too many and its first extra + 1 cells, as written, name a file in images_dir."""
    if extra < 1 or images_dir is None or '"' in text:
        return None
    spans = [match.span() for match in re.finditer(r"\S+", text)]
    name = text[spans[0][0]:spans[extra][1]]
    return name if _image_exists(images_dir, name) else None


def _check_width(where: str, text: str, tokens: list[str], width: int, images_dir: Path | None) -> None:
    """A row has the image name and one value per attribute; an image name with spaces says to quote it."""
    if len(tokens) - 1 == width:
        return
    joined = _joined_image_name(text, len(tokens) - 1 - width, images_dir)
    if joined:
        parts = [repr(t) for t in tokens[:len(tokens) - width]]
        raise AttrclfError(f"{where}: {', '.join(parts[:-1])} and {parts[-1]} look like one image name with a space; "
                           f'quote it: "{joined}"')
    raise AttrclfError(
        f"{where}: {len(tokens) - 1} values, expected {width} "
        f"(one per attribute after the image name, separated by spaces or tabs; quote a name with spaces)"
    )


def _header_names(file_name: str, header: tuple[int, str, list[str]], width: int) -> list[str]:
    number, _, tokens = header
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

    @property
    def positive_share(self) -> list[float]:
        """Positives among the known labels per attribute (0 where none is known): its prior."""
        return [p / k if k else 0.0 for p, k in zip(self.positive, self.known, strict=True)]

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
