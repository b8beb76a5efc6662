import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf.data import (
    collate,
    compute_pos_weight,
    label_counts,
    load_image,
    load_source,
    prepare_data,
    read_labels_file,
    split_by_group,
)
from attrclf.errors import AttrclfError

from .conftest import write_image


def test_labels_with_header_and_na_variants(labels_factory):
    root = labels_factory(["image_name Smile Hat Glasses", "a.png 1 0 NA", "b.png na -1 1", "c.png 0 1 N/A"])
    names, rows = read_labels_file(root / "labels.txt")
    assert names == ["Smile", "Hat", "Glasses"]
    assert [r["labels"] for r in rows] == [[1, 0, None], [None, None, 1], [0, 1, None]]
    assert [r["image_name"] for r in rows] == ["a.png", "b.png", "c.png"]


def test_labels_without_header_get_default_names(labels_factory):
    root = labels_factory(["a.png 1 0 NA 1", "b.png 0\t1 1   0"])
    names, rows = read_labels_file(root / "labels.txt")
    assert names == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert rows[1]["labels"] == [0, 1, 1, 0]


def test_header_of_attribute_names_only(labels_factory):
    root = labels_factory(["x y", "a.png 1 0", "b.png 0 1"])
    names, _ = read_labels_file(root / "labels.txt")
    assert names == ["x", "y"]


def test_dataset_from_labels_folder(labels_factory):
    root = labels_factory(["img x y", "a.png 1 0", "b.png NA 1"])
    splits, names, _ = load_source(root)
    ds = splits["train"]
    assert names == ["x", "y"] and len(ds) == 2
    assert ds[1]["labels"] == [None, 1]
    assert load_image(ds[0]["image"]).mode == "RGB"


def test_images_and_labels_overrides(tmp_path):
    write_image(tmp_path / "pics" / "a.png")
    write_image(tmp_path / "pics" / "b.png")
    (tmp_path / "my_labels.txt").write_text("a.png 1\nb.png 0\n")
    splits, names, _ = load_source(tmp_path, images=tmp_path / "pics", labels=tmp_path / "my_labels.txt")
    assert names == ["Attr1"] and len(splits["train"]) == 2


def test_label_columns_select_and_order(labels_factory):
    root = labels_factory(["img x y z", "a.png 1 0 1", "b.png 0 1 NA"])
    splits, names, _ = load_source(root, label_columns=["z", "x"])
    assert names == ["z", "x"]
    assert splits["train"][1]["labels"] == [None, 0]


# ---------------------------------------------------------------- bad input: one clear error each


def error_of(call) -> str:
    with pytest.raises(AttrclfError) as info:
        call()
    return str(info.value)


def test_ragged_row_names_line(labels_factory):
    lines = ["img a b c d"] + [f"i{n}.png 1 0 1 0" for n in range(15)] + ["i15.png 1 0 1"]
    root = labels_factory(lines)
    assert "labels.txt line 17: 3 values, expected 4" in error_of(lambda: load_source(root))


def test_bad_value_names_line_value_and_attribute(labels_factory):
    root = labels_factory(["img Attr1 Attr2 Attr3", "a.png 1 0 1", "b.png 1 0 x"])
    message = error_of(lambda: load_source(root))
    assert "labels.txt line 3: value 'x' for attribute 'Attr3' is not 0, 1 or NA" in message


def test_duplicate_image_names(labels_factory):
    root = labels_factory(["a.png 1 0", "b.png 1 1", "a.png 0 0"])
    message = error_of(lambda: load_source(root))
    assert "line 3" in message and "'a.png'" in message and "line 1" in message


def test_missing_images_listed_first_ten_and_count(labels_factory):
    lines = [f"img{n:02d}.png 1 0" for n in range(14)]
    root = labels_factory(lines, images=["img00.png", "img01.png"])
    message = error_of(lambda: load_source(root))
    assert "12 of 14 images" in message
    assert "img02.png" in message and "img11.png" in message and "img12.png" not in message


def test_empty_labels_file(labels_factory):
    root = labels_factory([], images=[])
    assert "no data rows" in error_of(lambda: load_source(root))


def test_header_only(labels_factory):
    root = labels_factory(["img a b"], images=[])
    assert "no data rows" in error_of(lambda: load_source(root))


def test_repeated_header_names(labels_factory):
    root = labels_factory(["img a b a", "x.png 1 0 1"])
    message = error_of(lambda: load_source(root))
    assert "line 1" in message and "'a' appears twice" in message


def test_label_columns_naming_missing_column(labels_factory):
    root = labels_factory(["img a b", "x.png 1 0"])
    message = error_of(lambda: load_source(root, label_columns=["a", "nope"]))
    assert "--label-columns" in message and "'nope'" in message and "a, b" in message


def test_missing_data_folder(tmp_path):
    assert "no such file or folder" in error_of(lambda: load_source(tmp_path / "nothing"))


def test_folder_without_labels(tmp_path):
    assert "labels.txt" in error_of(lambda: load_source(tmp_path))


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


def test_no_known_labels_in_training_is_a_warning(labels_factory):
    root = labels_factory(["img a b", *[f"i{n}.png {n % 2} NA" for n in range(10)]])
    data = prepare_data(root)
    assert any("'b' has no known labels" in w for w in data.warnings)


# ---------------------------------------------------------------- image folder with metadata


def test_imagefolder_metadata_csv(tmp_path):
    for n in range(4):
        write_image(tmp_path / f"{n}.png")
    (tmp_path / "metadata.csv").write_text("file_name,smile,hat,who\n0.png,1,,a\n1.png,0,NA,a\n2.png,null,1,b\n3.png,1,0,c\n")
    splits, names, _ = load_source(tmp_path, group_column="who")
    ds = splits["train"]
    assert names == ["smile", "hat"]
    assert ds["labels"] == [[1, None], [0, None], [None, 1], [1, 0]]
    assert ds["group"] == ["a", "a", "b", "c"]


def test_imagefolder_metadata_jsonl_with_validation_split(tmp_path):
    for split in ("train", "validation"):
        rows = []
        for n in range(3):
            write_image(tmp_path / split / f"{n}.png")
            rows.append({"file_name": f"{n}.png", "smile": [1, 0, None][n], "hat": ["NA", 1, 0][n], "note": "x"})
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare_data(tmp_path, label_columns=["smile", "hat"])
    assert data.label_names == ["smile", "hat"]
    assert data.split == "the dataset's own validation split"
    assert data.validation["labels"] == [[1, None], [0, 1], [None, 0]]


def test_metadata_bad_value_names_line_and_column(tmp_path):
    write_image(tmp_path / "0.png")
    (tmp_path / "metadata.csv").write_text("file_name,smile\n0.png,maybe\n")
    assert "metadata.csv line 2: value 'maybe' for attribute 'smile'" in error_of(lambda: load_source(tmp_path))


def test_metadata_label_columns_missing(tmp_path):
    write_image(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "smile": 1}))
    assert "'frown'" in error_of(lambda: load_source(tmp_path, label_columns=["frown"]))


def test_save_to_disk_dataset(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = []
    for n in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (n * 40, 0, 0)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    ds = Dataset.from_dict(
        {"img": images, "red": [1, 0, 1, None, 0, 1], "big": [0, 0, 1, 1, None, 0]},
        features=Features({"img": ImageFeature(), "red": Value("int64"), "big": Value("int64")}),
    )
    ds.save_to_disk(tmp_path / "saved")
    data = prepare_data(str(tmp_path / "saved"), val_fraction=0.34)
    assert data.label_names == ["red", "big"]
    assert len(data.train) + len(data.validation) == 6
    assert load_image(data.train[0]["image"]).size == (16, 16)


# ---------------------------------------------------------------- split, counts, pos_weight


def test_split_keeps_groups_together_and_is_seeded(labels_factory):
    lines = [f"i{n:03d}.png {n % 2} 1 g{n // 5}" for n in range(100)]
    root = labels_factory(["img a b grp", *lines])
    splits, names, _ = load_source(root, group_column="grp")
    assert names == ["a", "b"]
    train, val = split_by_group(splits["train"], 0.2, seed=3)
    assert not set(train["group"]) & set(val["group"])
    assert 15 <= len(val) <= 25
    again_train, again_val = split_by_group(splits["train"], 0.2, seed=3)
    assert again_val["image_name"] == val["image_name"]


def test_label_counts_and_pos_weight():
    labels = [[1, 0, None, None], [0, 0, None, 1], [0, 1, None, 1], [0, None, None, 1]]
    counts = label_counts(labels, 4)
    assert counts["positive"] == [1, 1, 0, 3]
    assert counts["negative"] == [3, 2, 0, 0]
    assert counts["na"] == [0, 1, 4, 1]
    weights, warnings = compute_pos_weight(counts, ["a", "b", "c", "d"], cap=50)
    assert weights.tolist()[:3] == [3.0, 2.0, 1.0]
    assert weights[3] == pytest.approx(1 / 50)  # no negatives: clamped, finite, non-zero
    assert any("'c' has no known labels" in w for w in warnings)
    assert any("'d' has no negative" in w for w in warnings)
    capped, _ = compute_pos_weight({"positive": [1], "negative": [500]}, ["rare"], cap=50)
    assert capped.item() == 50


def test_collate_builds_targets_and_mask():
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "labels": [1, None, 0]},
        {"pixel_values": None, "labels": [1, 1, 1]},  # failed to decode: dropped
        {"pixel_values": torch.ones(3, 4, 4), "labels": [None, 0, 1]},
    ]
    pixel_values, targets, mask = collate(items)
    assert pixel_values.shape == (2, 3, 4, 4)
    assert targets.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert mask.tolist() == [[True, False, True], [False, True, True]]


# ---------------------------------------------------------------- image modes


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
