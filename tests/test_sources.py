"""attrclf.sources: every source format -> the same dataset schema; missing or bad input is one clear error."""

import io
import json

import pytest
from PIL import Image

from attrclf.images import load_image
from attrclf.labels import compute_pos_weight, training_counts
from attrclf.sources import FEATURES, AttrData, LoadedSource, load_source, prepare_data

from .conftest import error_of, write_image


def test_dataset_from_labels_folder(labels_factory):
    root = labels_factory(["img x y", "a.png 1 0", "b.png NA 1"])
    source = load_source(root)
    ds = source.splits["train"]
    assert source.label_names == ["x", "y"] and len(ds) == 2
    assert ds[1]["labels"] == [None, 1]
    assert load_image(ds[0]["image"]).mode == "RGB"
    assert ds.features == FEATURES and ds["group"] == ["a.png", "b.png"]  # each image its own group
    assert source.description == f"{root / 'labels.txt'} + {root / 'images'}/"


def test_images_and_labels_overrides(tmp_path):
    write_image(tmp_path / "pics" / "a.png")
    write_image(tmp_path / "pics" / "b.png")
    (tmp_path / "my_labels.txt").write_text("a.png 1\nb.png 0\n")
    source = load_source(tmp_path, images=tmp_path / "pics", labels=tmp_path / "my_labels.txt")
    assert source.label_names == ["Attr1"] and len(source.splits["train"]) == 2


def test_label_columns_select_and_order(labels_factory):
    root = labels_factory(["img x y z", "a.png 1 0 1", "b.png 0 1 NA"])
    source = load_source(root, label_columns=["z", "x"])
    assert source.label_names == ["z", "x"]
    assert source.splits["train"][1]["labels"] == [None, 0]


def test_group_column_is_keyword_only(labels_factory):
    root = labels_factory(["img a grp", "a.png 1 g", "b.png 0 g"])
    assert load_source(root, group_column="grp").splits["train"]["group"] == ["g", "g"]
    with pytest.raises(TypeError):
        load_source(root, None, None, None, "grp")
    with pytest.raises(TypeError):
        prepare_data(root, None, None, None, "grp")


def test_missing_images_listed_first_ten_and_count(labels_factory):
    lines = [f"img{n:02d}.png 1 0" for n in range(14)]
    root = labels_factory(lines, images=["img00.png", "img01.png"])
    message = error_of(lambda: load_source(root))
    assert "12 of 14 images" in message
    assert "img02.png" in message and "img11.png" in message and "img12.png" not in message


def test_missing_data_folder(tmp_path):
    assert "no such file or folder" in error_of(lambda: load_source(tmp_path / "nothing"))


def test_path_like_names_are_not_taken_for_hub_ids():
    for name in ("./user/name", "a/b/c", "single"):
        assert "no such file or folder" in error_of(lambda name=name: load_source(name))


def test_folder_without_labels(tmp_path):
    assert "labels.txt" in error_of(lambda: load_source(tmp_path))


def test_no_known_labels_in_training_is_a_warning(labels_factory):
    """Said once, by compute_pos_weight on the split training uses; prepare_data no longer repeats it (issue 14)."""
    root = labels_factory(["img a b", *[f"i{n}.png {n % 2} NA" for n in range(10)]])
    data = prepare_data(root)
    assert data.warnings == []
    _, warnings = compute_pos_weight(training_counts(data.train["labels"], 2), data.label_names)
    assert warnings == ["attribute 'b' has no known labels in the training split; pos_weight set to 1"]


def test_prepare_data_splits_by_seed_and_says_how(labels_factory):
    root = labels_factory(["img a", *[f"i{n}.png {n % 2}" for n in range(10)]])
    data = prepare_data(root, val_fraction=0.2, seed=5)
    assert isinstance(data, AttrData) and (len(data.train), len(data.validation)) == (8, 2)
    assert data.split == "seeded random split (val_fraction=0.2, seed=5, by image)"
    assert prepare_data(root, val_fraction=0.2, seed=5).validation["image_name"] == data.validation["image_name"]
    assert data.skipped == [] and data.warnings == []


def test_too_few_training_images(labels_factory):
    root = labels_factory(["img a", "i0.png 1", "i1.png 0"])
    assert "need at least 2 training images, found 1" in error_of(lambda: prepare_data(root, val_fraction=0.5))


# ---------------------------------------------------------------- image folder with metadata


def test_imagefolder_metadata_csv(tmp_path):
    for n in range(4):
        write_image(tmp_path / f"{n}.png")
    (tmp_path / "metadata.csv").write_text(
        "file_name,smile,hat,who\n0.png,1,,a\n1.png,0,NA,a\n2.png,null,1,b\n3.png,1,0,c\n")
    source = load_source(tmp_path, group_column="who")
    ds = source.splits["train"]
    assert source.label_names == ["smile", "hat"]
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


@pytest.mark.parametrize("name, text, expected", [
    ("metadata.csv", "file_name,a,a\n0.png,1,0\n", "metadata.csv line 1: column 'a' appears twice in the header"),
    ("metadata.csv", "file_name,a\n0.png,1,0\n", "metadata.csv line 2: 3 values, expected 2"),
    ("metadata.csv", "file_name,a,b\n0.png,1\n", "metadata.csv line 2: 2 values, expected 3"),
    ("metadata.jsonl", '{"file_name": "0.png", "a": 1}\n{"file_name": "1.png"}\n', "metadata.jsonl line 2: keys"),
    ("metadata.jsonl", '{"file_name": "0.png", "a": 1}\n[1]\n', "line 2: expected a JSON object per line"),
    ("metadata.jsonl", '{"file_name": "0.png", "a": 1\n', "metadata.jsonl line 1: not valid JSON"),
    ("metadata.csv", "name,a\n0.png,1\n", "no 'file_name' column"),
    ("metadata.csv", "file_name\n0.png\n", "no attribute columns besides 'file_name'"),
    ("metadata.csv", "file_name,a\n0.png,1\n0.png,0\n", "line 3: image '0.png' is listed again (first on line 2)"),
])
def test_metadata_format_errors_name_the_line(tmp_path, name, text, expected):
    write_image(tmp_path / "0.png")
    write_image(tmp_path / "1.png")
    (tmp_path / name).write_text(text)
    assert expected in error_of(lambda: load_source(tmp_path))


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
    source = load_source(tmp_path / "saved")
    assert isinstance(source, LoadedSource) and source.description == f"dataset {tmp_path / 'saved'}"
    assert source.splits["train"]["labels"] == [[1, 0], [0, 0], [1, 1], [None, 1], [0, None], [1, 0]]
