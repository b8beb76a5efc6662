import contextlib
import io
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from attrclf import export
from attrclf.export import export_onnx, main


@pytest.fixture(scope="module")
def exported(saved_model, tmp_path_factory):
    """The tiny model exported once through the CLI: (path, model, what the CLI printed)."""
    folder, model = saved_model
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(folder), str(path)]) == 0
    return path, model, printed.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch_size):
    path, model, _ = exported
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size))
    with torch.no_grad():
        expected = model.eval()(pixel_values).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    assert logits.shape == (batch_size, 3)
    assert np.abs(logits - expected).max() < 1e-4


@pytest.mark.slow
def test_graph_has_a_dynamic_batch_axis_and_the_config_in_its_metadata(exported):
    path, _, _ = exported
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.opset_import[0].version == 18
    metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert metadata["label_names"] == ["red", "round", "big"]
    assert metadata["thresholds"] == [0.3, 0.5, 0.7]
    assert metadata["attrclf_config"]["backbone"] == "test_resnet"


@pytest.mark.slow
def test_cli_prints_the_check_and_the_labels(exported):
    path, _, out = exported
    assert "max abs diff vs PyTorch: batch 1:" in out and "batch 3:" in out
    assert "['red', 'round', 'big']" in out and "[0.3, 0.5, 0.7]" in out
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary file left


def test_bad_paths_are_clear_errors_and_leave_files_alone(saved_model, tmp_path, capsys):
    previous = tmp_path / "old.onnx"
    previous.write_bytes(b"previous export")
    assert main([str(tmp_path / "no-model"), str(previous)]) == 2
    assert "neither a model folder nor a Hub id" in capsys.readouterr().err
    assert main([str(saved_model[0]), str(tmp_path / "missing" / "m.onnx")]) == 2
    assert "output folder" in capsys.readouterr().err
    assert previous.read_bytes() == b"previous export"


@pytest.mark.slow
def test_a_failed_check_writes_nothing(saved_model, exported, tmp_path, monkeypatch):
    previous = tmp_path / "m.onnx"
    previous.write_bytes(b"previous export")
    monkeypatch.setattr(export, "to_onnx", lambda model, opset, weights_sha256=None: onnx.load(str(exported[0])))
    monkeypatch.setattr(export, "max_abs_diff", lambda model, path: {1: 0.5, 3: 0.1})
    with pytest.raises(export.AttrclfError, match="differs from PyTorch by 5.00e-01"):
        export_onnx(saved_model[1], previous)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and previous.read_bytes() == b"previous export"
