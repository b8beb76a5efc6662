"""Uploaded files for the app: decoding one safely, scoring several at once, their table and their CSV file.

Nothing here imports gradio: the page (attrclf.ui) passes in the upload records it gets and shows what these return.
A file that cannot be used gets its own message; the others are scored.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import AttrclfError
from .images import load_image

PRESENT, ABSENT = "PRESENT", "absent"
MAX_FILES = 1000  # per request: a folder bigger than this is refused with a message
CSV_NAME = "attrclf_attributes.csv"
CSV_KEEP_S = 3600  # CSV files older than this are removed when a new one is written


def read_upload(path: str | os.PathLike, name: str | None = None, decode=load_image):
    """An uploaded file decoded like training decodes it (attrclf.images.load_image: EXIF, alpha, 16-bit, CMYK).

    Args:
        path: The file.
        name: The name the user gave it (for messages); default the file's name.
        decode: Path -> what the caller needs: the RGB image (load_image, the default) or the model's input tensor
            (Predictor.preprocess, which decodes large JPEGs at a reduced scale).

    Raises:
        AttrclfError: empty file, not an image, or more pixels than PIL's MAX_IMAGE_PIXELS (a decompression bomb).
    """
    name = name or Path(path).name
    fix = "Upload a PNG, JPEG, WebP, BMP, GIF or TIFF image."
    if os.path.getsize(path) == 0:
        raise AttrclfError(f"'{name}' is empty (0 bytes). {fix}")
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it; this refuses instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                width, height = probe.size
        if width * height <= Image.MAX_IMAGE_PIXELS:
            return decode(path)
    except Image.DecompressionBombError:  # PIL refuses over twice its limit while reading the header
        pass
    except UnidentifiedImageError:
        raise AttrclfError(f"'{name}' is not an image file that can be read. {fix}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise AttrclfError(f"'{name}' could not be decoded ({e}). {fix}") from None
    raise AttrclfError(
        f"'{name}' has more than {Image.MAX_IMAGE_PIXELS:,} pixels, too many to decode safely "
        f"(a decompression bomb, or a huge photo). Resize it and upload it again."
    )


@dataclass
class FileScore:
    """One uploaded file's outcome: its probabilities (one per attribute), or why it could not be scored."""

    name: str
    probs: list[float] | None = None
    error: str | None = None


def upload_records(files: list | None) -> list[tuple[str, str]]:
    """(path, name the user gave) of each gradio file record (or plain path) of a multi-file upload."""
    records = []
    for item in files or []:
        if isinstance(item, dict):
            path = item.get("path")
            if not path:
                raise AttrclfError("Send each file as an uploaded file.")
            records.append((path, item.get("orig_name") or Path(path).name))
        else:
            records.append((str(item), Path(str(item)).name))
    if len(records) > MAX_FILES:
        raise AttrclfError(f"{len(records)} files at once is more than {MAX_FILES}: score them in parts, or use "
                           f"`attrclf predict FOLDER` for large folders.")
    return records


def score_files(predictor, records: list[tuple[str, str]], batch_size: int = 32) -> list[FileScore]:
    """Every file's probabilities (in batches of `batch_size`), or its own message when it cannot be used."""
    scores, pixel_values, readable = [], [], []
    for path, name in records:
        try:
            pixel_values.append(read_upload(path, name, decode=predictor.preprocess))
            readable.append(len(scores))
            scores.append(FileScore(name))
        except AttrclfError as e:
            scores.append(FileScore(name, error=str(e)))
    probs = predictor.probs_from_pixels(pixel_values, batch_size) if pixel_values else []
    for index, row in zip(readable, probs, strict=True):
        scores[index].probs = [float(p) for p in row]
    return scores


def to_state(scores: list[FileScore]) -> list[dict]:
    """What the page keeps between events (JSON): so a threshold change re-labels without the model."""
    return [asdict(score) for score in scores]


def from_state(state: list[dict] | None) -> list[FileScore]:
    return [FileScore(**item) for item in state or []]


def file_table(scores: list[FileScore], label_names: list[str], thresholds: list[float]) -> list[list[str]]:
    """One row per file: its name, "PRESENT 0.93" / "absent 0.12" per attribute, and a message (its error)."""
    rows = []
    for score in scores:
        if score.probs is None:
            rows.append([score.name, *[""] * len(label_names), score.error])
            continue
        cells = [f"{PRESENT if p >= t else ABSENT} {p:.2f}" for p, t in zip(score.probs, thresholds, strict=True)]
        rows.append([score.name, *cells, ""])
    return rows


def table_headers(label_names: list[str]) -> list[str]:
    return ["Image", *label_names, "Message"]


def file_csv(scores: list[FileScore], label_names: list[str], thresholds: list[float]) -> str:
    """The table as CSV: image, one PRESENT / absent column per attribute, one probability column per attribute,
    then the error (empty for a scored file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", *label_names, *[f"{name} probability" for name in label_names], "error"])
    for score in scores:
        if score.probs is None:
            writer.writerow([score.name, *[""] * (2 * len(label_names)), score.error])
            continue
        statuses = [PRESENT if p >= t else ABSENT for p, t in zip(score.probs, thresholds, strict=True)]
        writer.writerow([score.name, *statuses, *[f"{p:.6f}" for p in score.probs], ""])
    return buffer.getvalue()


def present_counts(scores: list[FileScore], label_names: list[str], thresholds: list[float]) -> str:
    """A one-line summary of the table: files scored, files refused, and how many images have each attribute."""
    if not scores:
        return "Upload several images or a folder to score them all at once."
    scored = [s for s in scores if s.probs is not None]
    counts = [sum(s.probs[a] >= t for s in scored) for a, t in enumerate(thresholds)]
    refused = len(scores) - len(scored)
    line = f"**{len(scored)} image(s) scored**"
    if refused:
        line += f", **{refused} could not be used** (see Message)"
    return line + ". Present: " + ", ".join(f"{n} {c}" for n, c in zip(label_names, counts, strict=True))


class CsvFolder:
    """Where the app writes the CSV downloads: one sub-folder per file (so names never collide between users),
    those older than CSV_KEEP_S removed as new ones are written. Under the system's temp folder, which gradio serves
    files from."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / "attrclf-app"

    def write(self, text: str) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self.prune()
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        path = folder / CSV_NAME
        path.write_text(text, encoding="utf-8")
        return str(path)

    def prune(self) -> None:
        cutoff = time.time() - CSV_KEEP_S
        for folder in self.root.iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:  # another process pruned it first
                pass
