"""Decoding images the one way training and serving share, and finding the images that cannot be decoded.

`load_image` turns a path, bytes, a `datasets` image dict ({"path", "bytes"}) or a PIL image into RGB with EXIF
orientation applied (`to_rgb`: alpha on white, 16-bit scaled, CMYK / palette converted). The serving path (Predictor,
the app) decodes uploads with it, so this module never imports `datasets`: it takes datasets duck-typed.
"""

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
    """Why an image (path, bytes or image dict) cannot be used; None if it decodes. Cheap: JPEGs decode at low scale."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") else source["path"]
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
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


def image_problems(sources: list, workers: int | None = None) -> list[str | None]:
    """image_problem of every source, in threads (PIL releases the GIL while it decodes)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(image_problem, sources))


def drop_unreadable(ds, workers: int | None = None) -> tuple[object, list[dict]]:
    """Decode every image once (in threads); return the readable rows and a list of the others with reasons.

    Args:
        ds: A `datasets.Dataset` (taken duck-typed) with an `image` and an `image_name` column.
        workers: Threads; default twice the CPUs, at most 8.

    Returns:
        (ds without the unreadable rows, [{"image": name, "reason": text}, ...]).
    """
    feature = ds.features["image"]
    undecoded = ds.cast_column("image", dataclasses.replace(feature, decode=False)) if feature.decode else ds
    problems = image_problems(undecoded["image"], workers)
    bad = [i for i, p in enumerate(problems) if p]
    if not bad:
        return ds, []
    names = ds["image_name"]
    skipped = [{"image": names[i], "reason": problems[i]} for i in bad]
    keep = sorted(set(range(len(ds))) - set(bad))
    return ds.select(keep), skipped
