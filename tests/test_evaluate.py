"""attrclf evaluate: a hand example with NA gives the hand-computed AP and F1; files, messages, unreadable images."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from attrclf import Predictor
from attrclf.evaluate import evaluate, main, read_test_set, score_attributes

# Four images, two attributes. NA entries carry probabilities that would change every score if NA were counted:
# img3's `a` (0.95, NA) would be a false positive, img0's `b` (0.85, NA) would rank above b's only positive.
LINES = ["image a b", "img0.png 1 NA", "img1.png 0 1", "img2.png 1 0", "img3.png NA 0"]
PROBS = np.array([[0.9, 0.85], [0.6, 0.7], [0.4, 0.8], [0.95, 0.1]], dtype=np.float32)
THRESHOLDS = [0.3, 0.75]
# By hand, known labels only:
#   a: (0.9, 1) (0.6, 0) (0.4, 1) -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; at 0.3 all predicted: tp 2 fp 1 fn 0 -> P 2/3,
#      R 1, F1 0.8; at 0.5: tp 1 fp 1 fn 1 -> F1 0.5
#   b: (0.8, 0) (0.7, 1) (0.1, 0) -> AP = 1/2; at 0.75: tp 0 fp 1 fn 1 -> F1 0; at 0.5: tp 1 fp 1 fn 0 -> F1 2/3
#   mAP 2/3; macro-F1 0.4 (0.5 and 2/3 -> 7/12 at 0.5); micro-F1 2*2 / (2*2 + 2 + 1) = 4/7, at 0.5 likewise 4/7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_factory):
    model = tiny_model_factory(("a", "b"))
    model.config.thresholds = list(THRESHOLDS)
    folder = tmp_path_factory.mktemp("eval_model")
    model.save_pretrained(folder)
    return folder


def scripted(model_dir, names: list[str], probs: np.ndarray) -> Predictor:
    """The saved model's Predictor, decoding every image for real but returning `probs` (by file name)."""
    predictor = Predictor.from_pretrained(str(model_dir))
    decode = predictor.preprocess

    def preprocess(source):
        decode(source)  # as evaluate would: an unreadable file raises here
        return torch.tensor([float(names.index(Path(source["path"]).name))])

    predictor.preprocess = preprocess
    predictor.probs_from_pixels = lambda pixels, batch_size=32: probs[[int(p.item()) for p in pixels]]
    return predictor


def test_hand_example_with_na(model_dir, labels_factory):
    data = labels_factory(LINES)
    names = [line.split()[0] for line in LINES[1:]]
    result = evaluate(scripted(model_dir, names, PROBS), read_test_set(str(data)), model="m", batch_size=3)
    a, b = result.attributes
    assert (a.ap, b.ap) == (pytest.approx(5 / 6), pytest.approx(0.5))
    assert a.ap == pytest.approx(average_precision_score([1, 0, 1], [0.9, 0.6, 0.4]))
    assert (a.precision, a.recall, a.f1, a.f1_at_half) == pytest.approx((2 / 3, 1.0, 0.8, 0.5))
    assert (b.precision, b.recall, b.f1, b.f1_at_half) == pytest.approx((0.0, 0.0, 0.0, 2 / 3))
    assert (a.support, a.negatives, a.na, b.support, b.negatives, b.na) == (2, 1, 1, 1, 2, 1)
    assert (a.threshold, b.threshold) == (0.3, 0.75)
    assert result.mAP == pytest.approx(2 / 3) and result.f1_macro == pytest.approx(0.4)
    assert result.f1_micro == pytest.approx(4 / 7) and result.f1_micro_at_half == pytest.approx(4 / 7)
    assert result.f1_macro_at_half == pytest.approx(7 / 12)
    assert result.missing == [] and result.unreadable == [] and result.image_names == names


def test_one_class_attribute_is_left_out_of_map():
    attributes, summary = score_attributes(np.array([[0.9, 0.2], [0.1, 0.3]]), [[1, 0], [0, 0]], ["a", "b"],
                                           [0.5, 0.5])
    assert [x.evaluated for x in attributes] == [True, False] and attributes[1].ap is None
    assert summary["mAP"] == 1.0 and summary["f1_macro"] == 1.0


def test_cli_writes_exactly_its_files(model_dir, labels_factory, tmp_path, capsys, monkeypatch):
    data = labels_factory(LINES)
    names = [line.split()[0] for line in LINES[1:]]
    predictor = scripted(model_dir, names, PROBS)
    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(lambda cls, *args, **kwargs: predictor))
    out = tmp_path / "eval"
    assert main(["--model", str(model_dir), "--data", str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 images scored, 0 unreadable" in printed and "mAP 0.667" in printed and "macro-F1 0.400" in printed
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "pr_curves.png", "predictions.csv"]
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(2 / 3) and metrics["num_images"] == 4 and metrics["unreadable"] == []
    assert metrics["per_attribute"]["a"]["ap"] == pytest.approx(5 / 6) and metrics["per_attribute"]["b"]["na"] == 1
    assert metrics["f1_macro_at_0.5"] == pytest.approx(7 / 12) and metrics["label_names"] == ["a", "b"]
    assert metrics["attrclf_version"] and metrics["missing_attributes"] == []
    rows = list(csv.reader((out / "predictions.csv").read_text().splitlines()))
    assert rows[0] == ["image", "a", "b", "a_label", "b_label"]
    assert rows[1] == ["img0.png", "0.900000", "0.850000", "1", ""]
    assert rows[4] == ["img3.png", "0.950000", "0.100000", "", "0"]
    assert len(rows) == 5


def test_unknown_attribute_names_list_both_sets(model_dir, labels_factory, capsys):
    data = labels_factory(["image a smile", "x.png 1 0", "y.png 0 1"])
    assert main(["--model", str(model_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the test set labels attributes the model does not predict: smile")
    assert "test set: a, smile" in err and "model:    a, b" in err


def test_a_subset_of_the_attributes_is_scored_and_said(model_dir, labels_factory, capsys):
    data = labels_factory(["image b", "x.png 1", "y.png 0", "z.png NA"])
    assert main(["--model", str(model_dir), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "the test set labels 1 of the model's 2 attributes; not scored: a" in printed
    assert "3 images scored" in printed


def test_a_corrupt_image_is_listed_and_counted(model_dir, labels_factory, tmp_path, capsys):
    data = labels_factory(LINES)
    (data / "images" / "img2.png").write_bytes(b"not a png at all")
    out = tmp_path / "eval"
    assert main(["--model", str(model_dir), "--data", str(data), "--output", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 images scored, 1 unreadable" in printed and "unreadable img2.png: cannot read image" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and [u["image"] for u in metrics["unreadable"]] == ["img2.png"]
    assert metrics["per_attribute"]["a"]["support"] == 1 and metrics["per_attribute"]["a"]["na"] == 1
    rows = list(csv.reader((out / "predictions.csv").read_text().splitlines()))
    assert [r[0] for r in rows[1:]] == ["img0.png", "img1.png", "img3.png"]


def test_a_labels_file_read_as_training_reads_it(model_dir, labels_factory, tmp_path):
    """--labels / --images / --group-column: a held-out labels file elsewhere, with a group column that is no
    attribute, gives the same result as the plain folder."""
    data = labels_factory(LINES)
    names = [line.split()[0] for line in LINES[1:]]
    grouped = tmp_path / "held_out.txt"
    grouped.write_text("\n".join([LINES[0] + " group"] + [f"{line} g{i // 2}" for i, line in enumerate(LINES[1:])]))
    test = read_test_set(str(data), labels=str(grouped), images=str(data / "images"), group_column="group")
    assert test.label_names == ["a", "b"] and test.image_names == names
    plain = evaluate(scripted(model_dir, names, PROBS), read_test_set(str(data)), model="m", batch_size=3)
    held = evaluate(scripted(model_dir, names, PROBS), test, model="m", batch_size=3)
    assert held.mAP == pytest.approx(plain.mAP) == pytest.approx(2 / 3)
