"""Predictor's backends (attrclf.backends) against fp32 torch on the same images, int8 quantization (attrclf.quantize)
and `auto`'s choice. Known answers: onnx within 1e-4, torch-bf16 within 1e-2, onnx-int8 within its recorded
tolerance; the recorded mAPs are those `attrclf evaluate` computes."""

import contextlib
import io
import json
import shutil

import numpy as np
import onnx
import pytest

from attrclf import Predictor, backends
from attrclf.errors import AttrclfError
from attrclf.export import main as export_main
from attrclf.hardware import fast_cpu_bf16
from attrclf.quantize import KEEP_FLOAT, excluded_nodes, find_images, mean_ap, node_kinds

from .conftest import error_of, tiny_split, write_labels_dataset

LABELS = ["red", "round", "big"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """40 labelled images of random colours and sizes (labels.txt folder)."""
    rng = np.random.default_rng(1)
    lines = ["img red round big"] + [f"c{n:02d}.png {int(rng.integers(0, 2))} {int(rng.integers(0, 2))} "
                                     f"{'NA' if n % 7 == 0 else int(rng.integers(0, 2))}" for n in range(40)]
    return write_labels_dataset(tmp_path_factory.mktemp("calib") / "data", lines)


@pytest.fixture(scope="module")
def exported(saved_model, calibration, tmp_path_factory):
    """The tiny model folder with model.onnx and model.int8.onnx written beside its weights by `attrclf export`."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(saved_model[0], folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_main([str(folder), "--calibrate", str(calibration)]) == 0
    return folder, printed.getvalue()


def images_of(calibration):
    return sorted((calibration / "images").iterdir())


def probs(folder, backend, images):
    return Predictor.from_pretrained(str(folder), device="cpu", backend=backend).predict_probs(images)


def test_export_writes_both_graphs_beside_the_weights_with_the_record(exported):
    folder, out = exported
    assert {"model.onnx", "model.int8.onnx"} <= {p.name for p in folder.iterdir()}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    metadata = {p.key: p.value for p in onnx.load(str(folder / "model.int8.onnx")).metadata_props}
    record = json.loads(metadata[backends.QUANTIZATION_KEY])
    assert record["images"] == 40 and record["format"] == "qdq"
    assert record["mAP_change_points"] == pytest.approx(100 * (record["mAP_int8"] - record["mAP_fp32"]), abs=1e-3)
    assert record["default_allowed"] == (record["mAP_change_points"] >= -0.5)
    assert json.loads(metadata["label_names"]) == LABELS and backends.WEIGHTS_KEY in metadata
    assert "wrote" in out and "validation mAP" in out


def test_int8_keeps_the_first_convolution_and_the_head_fp32_and_records_the_settings(exported):
    folder, _ = exported
    model = onnx.load(str(folder / "model.int8.onnx"))
    record = json.loads({p.key: p.value for p in model.metadata_props}[backends.QUANTIZATION_KEY])
    assert record["calibration_method"] == "minmax" and record["keep_float"] == list(KEEP_FLOAT) == ["first", "head"]
    kinds = node_kinds(model)  # read on the int8 graph: the fp32 nodes kept their float weights (head.*) and input
    assert len(kinds["first"]) == 1 and kinds["head"] and record["nodes_kept_float"] == len(kinds["first"]) + len(
        kinds["head"])
    made_by = {out: node.op_type for node in model.graph.node for out in node.output}
    fp32 = set(kinds["first"] + kinds["head"])
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for node in weighted:  # a quantized node reads its weight through DequantizeLinear; a kept one reads floats
        assert (made_by.get(node.input[1]) == "DequantizeLinear") == (node.name not in fp32), node.name
    assert any(n.name not in fp32 for n in weighted)  # the rest is int8
    with pytest.raises(AttrclfError, match="unknown node kind"):
        excluded_nodes(model, ("classifier",))


def test_int8_keep_float_none_quantizes_every_weighted_node_and_bad_parts_are_refused(exported, calibration,
                                                                                     tmp_path, capsys):
    out = tmp_path / "all.onnx"
    assert export_main([str(exported[0]), str(out), "--calibrate", str(calibration), "--int8-keep-float", "none"]) == 0
    model = onnx.load(str(tmp_path / "all.int8.onnx"))
    record = json.loads({p.key: p.value for p in model.metadata_props}[backends.QUANTIZATION_KEY])
    assert record["keep_float"] == [] and record["nodes_kept_float"] == 0 and "fp32 parts: none" in (
        capsys.readouterr().out)
    made_by = {out: node.op_type for node in model.graph.node for out in node.output}
    assert all(made_by.get(n.input[1]) == "DequantizeLinear" for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert export_main([str(exported[0]), str(tmp_path / "bad.onnx"), "--int8-keep-float", "head,stem"]) == 2
    assert "unknown part(s) stem" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_onnx_fp32_matches_torch_within_1e4(exported, calibration):
    folder, _ = exported
    images = images_of(calibration)
    reference = probs(folder, "torch", images)
    predictor = Predictor.from_pretrained(str(folder), device="cpu", backend="onnx")
    assert predictor.backend_name == "onnx"
    assert np.abs(predictor.predict_probs(images, batch_size=7) - reference).max() < 1e-4


@pytest.mark.skipif(not fast_cpu_bf16(), reason="this CPU has no native bf16: torch-bf16 is refused (tested below)")
def test_bf16_matches_torch_within_1e2(exported, calibration):
    images = images_of(calibration)
    bf16 = probs(exported[0], "torch-bf16", images)
    assert np.abs(bf16 - probs(exported[0], "torch", images)).max() < 1e-2


def test_bf16_is_refused_without_native_bf16(saved_model, monkeypatch):
    monkeypatch.setattr(backends, "fast_cpu_bf16", lambda: False)
    assert "no native bf16" in error_of(lambda: Predictor.from_pretrained(str(saved_model[0]), device="cpu",
                                                                          backend="torch-bf16"))


def test_int8_within_its_recorded_tolerance_and_map_as_evaluate_computes_it(exported, calibration):
    folder, _ = exported
    images = images_of(calibration)
    predictor = Predictor.from_pretrained(str(folder), device="cpu", backend="onnx-int8")
    record = predictor.backend.quantization
    reference, int8 = probs(folder, "torch", images), predictor.predict_probs(images)
    assert np.abs(int8 - reference).max() <= record["max_prob_diff"] + 1e-6
    labelled = find_images(str(folder), str(calibration), LABELS)
    assert mean_ap(reference, labelled.labels, LABELS) == pytest.approx(record["mAP_fp32"], abs=1e-6)
    assert mean_ap(int8, labelled.labels, LABELS) == pytest.approx(record["mAP_int8"], abs=1e-6)


def test_int8_refusal_rule():
    assert backends.int8_refusal(None)
    assert backends.int8_refusal({"mAP_change_points": -0.51}) and "0.51" in backends.int8_refusal(
        {"mAP_change_points": -0.51})
    assert backends.int8_refusal({"mAP_change_points": -0.5}) is None
    assert backends.int8_refusal({"mAP_change_points": None})


def test_auto_picks_a_measured_backend_and_caches_the_choice(exported, monkeypatch):
    monkeypatch.delenv("ATTRCLF_BACKEND", raising=False)
    first = Predictor.from_pretrained(str(exported[0]), device="cpu")
    choice = first.choice
    assert not choice.cached and first.backend_name == choice.backend
    assert {"torch", "onnx"} <= set(choice.timings) | set(choice.refused)
    assert "onnx-int8" in set(choice.timings) | set(choice.refused)
    second = Predictor.from_pretrained(str(exported[0]), device="cpu")
    assert second.choice.cached and second.backend_name == first.backend_name


def test_auto_refuses_int8_whose_map_fell(exported, monkeypatch, tmp_path):
    monkeypatch.delenv("ATTRCLF_BACKEND", raising=False)
    monkeypatch.setenv("ATTRCLF_CACHE", str(tmp_path))
    monkeypatch.setattr(backends.OnnxBackend, "quantization", property(lambda self: {"mAP_change_points": -2.0}))
    predictor = Predictor.from_pretrained(str(exported[0]), device="cpu")
    assert predictor.backend_name != "onnx-int8" and "falls 2.00 points" in predictor.choice.refused["onnx-int8"]


def test_the_env_variable_pins_auto_and_explicit_backends_need_their_files(saved_model, exported, monkeypatch):
    monkeypatch.setenv("ATTRCLF_BACKEND", "onnx")
    assert Predictor.from_pretrained(str(exported[0]), device="cpu").backend_name == "onnx"
    assert Predictor.from_pretrained(str(exported[0]), device="cpu", backend="torch").backend_name == "torch"
    assert "attrclf export" in error_of(lambda: Predictor.from_pretrained(str(saved_model[0]), backend="onnx"))
    assert "unknown backend" in error_of(lambda: Predictor.from_pretrained(str(saved_model[0]), backend="tensorrt"))


def test_an_onnx_file_from_other_weights_is_refused(exported, tiny_model_factory, tmp_path):
    folder = tmp_path / "retrained"
    shutil.copytree(exported[0], folder)
    model = tiny_model_factory(LABELS, seed=5)
    model.config.thresholds = [0.3, 0.5, 0.7]
    model.save_pretrained(folder)  # trained again, not exported again
    assert "other weights" in error_of(lambda: Predictor.from_pretrained(str(folder), backend="onnx"))


def test_validation_images_are_rebuilt_from_the_training_config(saved_model, tiny_data, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model[0], folder)
    train_config = {"data": str(tiny_data), "images": None, "labels": None, "label_columns": None,
                    "group_column": "grp", "val_fraction": 0.25, "seed": 42}
    (folder / "train_config.json").write_text(json.dumps(train_config))
    (folder / "metrics.json").write_text(json.dumps({"data": {"validation_images": 18}}))
    found = find_images(str(folder), None, ["a", "b", "c"])
    expected = tiny_split(tiny_data)
    assert [image["path"] for image in found.images] == [image["path"] for image in expected.validation["image"]]
    assert found.labels == [list(row) for row in expected.validation["labels"]]
    (folder / "metrics.json").write_text(json.dumps({"data": {"validation_images": 20}}))
    assert "changed" in error_of(lambda: find_images(str(folder), None, ["a", "b", "c"]))
    assert find_images(str(saved_model[0]), None, LABELS) is None  # no train_config.json: no validation images


def test_export_without_validation_images_writes_fp32_and_says_so(saved_model, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main([str(saved_model[0]), str(out)]) == 0
    assert "int8: skipped" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
