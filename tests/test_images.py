"""attrclf.images: every image mode decodes to RGB, unreadable images are found with a reason, no `datasets` import."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attrclf.images import drop_unreadable, image_problem, image_problems, load_image, to_rgb
from attrclf.sources import prepare_data

from .conftest import REPO


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "F"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    image = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode) if mode != "I;16" else None
    if mode == "I;16":
        image = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.uint16))
    if mode == "F":
        path = tmp_path / "x.tiff"
    elif mode == "CMYK":
        path = tmp_path / "x.jpg"
    else:
        path = tmp_path / "x.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_half_transparent_pixels_blend_on_white():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 51))  # 20 % black over white: 255 * 0.8 = 204
    assert to_rgb(image).getpixel((0, 0)) == (204, 204, 204)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 32896  # 128 * 257
    loaded = load_image(Image.fromarray(array))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg").size == (10, 30)


def test_every_source_form_decodes_the_same(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (5, 3), (9, 8, 7)).save(path)
    data = path.read_bytes()
    for source in (path, str(path), data, {"path": str(path), "bytes": None}, {"path": None, "bytes": data}):
        image = load_image(source)
        assert image.size == (5, 3) and image.getpixel((0, 0)) == (9, 8, 7)


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_problem_names_each_kind_of_failure(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "trunc.png").write_bytes(png_bytes()[:100])
    (tmp_path / "good.png").write_bytes(png_bytes())
    assert image_problem(tmp_path / "good.png") is None
    assert image_problem({"path": None, "bytes": png_bytes()}) is None
    assert image_problem(tmp_path / "missing.png") == "file not found"
    assert image_problem(str(tmp_path / "empty.png")) == "empty file (0 bytes)"
    assert image_problem(tmp_path / "text.png") == "not an image PIL can read"
    assert image_problem(tmp_path / "trunc.png").startswith("cannot decode")
    assert image_problems([tmp_path / "good.png", tmp_path / "missing.png"], workers=2) == [None, "file not found"]


def test_drop_unreadable_keeps_the_readable_rows_of_a_decoded_column():
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = [{"bytes": png_bytes((8, 8)), "path": None}, {"bytes": b"junk", "path": None},
              {"bytes": png_bytes((8, 8)), "path": None}]
    ds = Dataset.from_dict({"image": images, "image_name": ["a", "b", "c"]},
                           features=Features({"image": ImageFeature(), "image_name": Value("string")}))
    kept, skipped = drop_unreadable(ds)
    assert kept["image_name"] == ["a", "c"]
    assert skipped == [{"image": "b", "reason": "not an image PIL can read"}]
    same, none = drop_unreadable(kept)
    assert same is kept and none == []


def test_unreadable_images_are_skipped_and_listed(labels_factory):
    lines = [f"ok{n}.png {n % 2} 1" for n in range(10)] + ["empty.png 1 0", "trunc.png 0 1", "text.png 1 1"]
    root = labels_factory(lines, images=[f"ok{n}.png" for n in range(10)])
    (root / "images" / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (root / "images" / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "images" / "text.png").write_text("not an image")
    data = prepare_data(root, val_fraction=0.3)
    skipped = {item["image"]: item["reason"] for item in data.skipped}
    assert set(skipped) == {"empty.png", "trunc.png", "text.png"}
    assert "0 bytes" in skipped["empty.png"]
    assert len(data.train) + len(data.validation) == 10


def heavy_modules_after_importing(module: str) -> list[str]:
    """Which of datasets, accelerate, matplotlib a fresh interpreter has loaded after `import module`."""
    heavy = ("datasets", "accelerate", "matplotlib")
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_images_does_not_import_datasets():
    assert heavy_modules_after_importing("attrclf.images") == []


@pytest.mark.slow  # imports timm and torch in a fresh interpreter: several seconds on 2 cores
def test_transforms_does_not_import_datasets():
    assert heavy_modules_after_importing("attrclf.transforms") == []
