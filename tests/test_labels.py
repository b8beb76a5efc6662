"""attrclf.labels: label values, the labels.txt reader and its errors, column checks, counts and pos_weight."""

import pytest

from attrclf.errors import AttrclfError
from attrclf.labels import (
    LabelCounts,
    check_group_column,
    check_label_columns,
    compute_pos_weight,
    label_counts,
    parse_label,
    parse_label_at,
    read_labels_file,
    select_columns,
    training_counts,
)
from attrclf.sources import load_source

from .conftest import error_of


@pytest.mark.parametrize("value, expected", [
    (1, 1), (0, 0), (True, 1), (False, 0), (1.0, 1), (-1, None), (float("nan"), None), (None, None),
    ("1", 1), (" TRUE ", 1), ("0.0", 0), ("false", 0), ("NA", None), ("n/a", None), ("null", None), ("", None),
])
def test_parse_label_tokens(value, expected):
    assert parse_label(value) == expected


@pytest.mark.parametrize("value", [2, 0.5, "yes", "x", "-2"])
def test_parse_label_rejects_everything_else(value):
    with pytest.raises(ValueError):
        parse_label(value)
    with pytest.raises(AttrclfError, match=f"f.txt line 4: value '{value}' for attribute 'hat' is not 0, 1 or NA"):
        parse_label_at(value, "f.txt line 4", "hat")


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


def test_group_column_comments_and_line_numbers(labels_factory):
    root = labels_factory(["# made by hand", "img a grp b", "", "p.png 1 g1 NA", "q.png 0 g1 1"])
    names, rows = read_labels_file(root / "labels.txt", group_column="grp")
    assert names == ["a", "b"]
    assert rows == [{"image_name": "p.png", "labels": [1, None], "group": "g1", "line": 4},
                    {"image_name": "q.png", "labels": [0, 1], "group": "g1", "line": 5}]
    assert "'nope' is not a column of labels.txt (columns: a, grp, b)" in error_of(
        lambda: read_labels_file(root / "labels.txt", group_column="nope"))


def test_select_columns_and_column_checks():
    rows = [{"labels": [1, 0, None]}, {"labels": [0, None, 1]}]
    names, rows = select_columns(["x", "y", "z"], rows, ["z", "x"], "f.txt")
    assert names == ["z", "x"] and [r["labels"] for r in rows] == [[None, 1], [1, 0]]
    assert select_columns(["x"], rows, None, "f.txt") == (["x"], rows)
    assert "'x' appears twice" in error_of(lambda: check_label_columns(["x", "x"], ["x", "y"], "f.txt"))
    check_group_column(None, [], "f.txt")
    assert "--group-column: 'g' is not a column of f.txt (columns: x)" in error_of(
        lambda: check_group_column("g", ["x"], "f.txt"))


# ---------------------------------------------------------------- bad input: one clear error each


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


def test_missing_labels_file(tmp_path):
    assert "labels file" in error_of(lambda: read_labels_file(tmp_path / "labels.txt"))


# ---------------------------------------------------------------- counts and pos_weight


def test_label_counts_on_a_hand_example_with_na():
    # a: 1 1 0 NA -> 2 positive, 1 negative, 1 NA; b: NA NA NA 0 -> 0, 1, 3
    counts = label_counts([[1, None], [1, None], [0, None], [None, 0]], 2)
    assert counts == LabelCounts(positive=[2, 0], negative=[1, 1], na=[1, 3])
    assert counts.known == [3, 1]
    assert counts.by_attribute(["a", "b"]) == {"a": {"positive": 2, "negative": 1, "na": 1},
                                               "b": {"positive": 0, "negative": 1, "na": 3}}
    with pytest.raises(ValueError):
        counts.by_attribute(["a"])  # one name per attribute


def test_label_counts_and_pos_weight():
    labels = [[1, 0, None, None], [0, 0, None, 1], [0, 1, None, 1], [0, None, None, 1]]
    counts = label_counts(labels, 4)
    assert counts.positive == [1, 1, 0, 3]
    assert counts.negative == [3, 2, 0, 0]
    assert counts.na == [0, 1, 4, 1]
    weights, warnings = compute_pos_weight(counts, ["a", "b", "c", "d"], cap=50)
    assert weights.tolist()[:3] == [3.0, 2.0, 1.0]
    assert weights[3] == pytest.approx(1 / 50)  # no negatives: clamped, finite, non-zero
    assert any("'c' has no known labels" in w for w in warnings)
    assert any("'d' has no negative" in w for w in warnings)
    capped, _ = compute_pos_weight(LabelCounts(positive=[1], negative=[500], na=[0]), ["rare"], cap=50)
    assert capped.item() == 50


def test_na_policy_negative_counts_na_as_negative_for_pos_weight():
    labels = [[1, None], [0, None], [None, 1], [None, 0]]
    ignore = training_counts(labels, 2, "ignore")
    negative = training_counts(labels, 2, "negative")
    assert ignore.negative == [1, 1] and ignore.na == [2, 2]
    assert negative.positive == [1, 1] and negative.negative == [3, 3] and negative.na == [0, 0]
    assert negative.known == [4, 4]
    assert compute_pos_weight(negative, ["a", "b"])[0].tolist() == [3.0, 3.0]
    assert compute_pos_weight(ignore, ["a", "b"])[0].tolist() == [1.0, 1.0]
