import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf import AttrclfError, Predictor
from attrclf.images import load_image
from attrclf.predict import main
from attrclf.transforms import eval_transform

from .conftest import REPO, write_image


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "red.png", (220, 20, 20), (40, 40))
    write_image(folder / "blue.png", (20, 20, 220), (30, 50))
    Image.new("RGBA", (40, 40), (0, 200, 0, 128)).save(folder / "green.png")
    return folder


def test_predictor_matches_model_on_preprocessed_image(saved_model, images):
    folder, model = saved_model
    predictor = Predictor.from_pretrained(str(folder), device="cpu")
    result = predictor.predict(images / "red.png")
    x = eval_transform(model.config)(load_image(images / "red.png"))[None]
    with torch.no_grad():
        expected = torch.sigmoid(model(x))[0].numpy()
    assert list(result["probabilities"]) == ["red", "round", "big"]
    assert np.allclose(list(result["probabilities"].values()), expected, atol=1e-6)
    assert result["thresholds"] == {"red": 0.3, "round": 0.5, "big": 0.7}
    assert result["present"] == [n for n, p, t in zip(["red", "round", "big"], expected, [0.3, 0.5, 0.7], strict=True)
                                 if p >= t]


def test_batch_and_global_threshold(saved_model, images):
    predictor = Predictor.from_pretrained(str(saved_model[0]), device="cpu")
    paths = sorted(images.iterdir())
    results = predictor.predict(paths, threshold=0.0)
    assert len(results) == 3 and all(r["present"] == ["red", "round", "big"] for r in results)
    at_one = predictor.predict(paths, threshold=1.0)
    assert all(r["present"] == [] for r in at_one if max(r["probabilities"].values()) < 1)
    single = [predictor.predict(p) for p in paths]
    for one, batched in zip(single, results, strict=True):
        assert list(one["probabilities"].values()) == pytest.approx(list(batched["probabilities"].values()), abs=1e-6)
    with pytest.raises(AttrclfError, match="between 0 and 1"):
        predictor.predict(paths[0], threshold=1.5)


def test_cli_table_prints_every_attribute_and_honours_threshold(saved_model, images, capsys):
    assert main(["--model", str(saved_model[0]), str(images / "red.png")]) == 0
    out = capsys.readouterr().out
    for name in ("red", "round", "big"):
        assert name in out
    assert "Probability" in out and "Attributes present" in out
    assert main(["--model", str(saved_model[0]), str(images / "red.png"), "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("[PRESENT]") == 3 and "['red', 'round', 'big']" in out


def test_cli_json_and_csv_for_a_folder(saved_model, images, capsys):
    assert main(["--model", str(saved_model[0]), str(images), "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"].rsplit("/", 1)[1] for r in results] == ["blue.png", "green.png", "red.png"]
    assert set(results[0]) == {"image", "probabilities", "thresholds", "present"}
    assert main(["--model", str(saved_model[0]), str(images), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and {"red", "round", "big"} <= set(rows[0])
    assert float(rows[0]["red"]) == pytest.approx(results[0]["probabilities"]["red"], abs=1e-6)


def test_cli_reports_unreadable_image_and_continues(saved_model, images, capsys):
    (images / "broken.png").write_text("not an image")
    code = main(["--model", str(saved_model[0]), str(images), "--format", "json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == 1 and len(results) == 4
    assert "error" in next(r for r in results if r["image"].endswith("broken.png"))
    assert "1 of 4 images could not be read" in captured.err


@pytest.mark.slow
def test_cli_missing_model_is_a_clear_error_without_traceback(tmp_path, images):
    result = subprocess.run(
        [sys.executable, "-m", "attrclf.predict", "--model", str(tmp_path / "nope"), str(images / "red.png")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    assert "neither a model folder nor a Hub id" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- test-time augmentation


@pytest.fixture
def half_and_half(tmp_path):
    image = Image.new("RGB", (40, 40), (220, 20, 20))
    image.paste((20, 20, 220), (20, 0, 40, 40))  # right half blue: the mirror image differs
    return image


def test_tta_is_the_mean_of_the_probabilities_of_the_image_and_its_mirror(saved_model, half_and_half):
    folder, model = saved_model
    plain = Predictor.from_pretrained(str(folder), device="cpu")
    tta = Predictor.from_pretrained(str(folder), device="cpu", tta=True)
    x = eval_transform(model.config)(half_and_half)[None]
    with torch.no_grad():
        original, mirrored = torch.sigmoid(model(x))[0].numpy(), torch.sigmoid(model(x.flip(-1)))[0].numpy()
    assert np.abs(original - mirrored).max() > 1e-4  # the flip matters for this model and image
    probs = tta.predict_probs([half_and_half, half_and_half])
    assert probs.shape == plain.predict_probs([half_and_half, half_and_half]).shape == (2, 3)
    assert np.allclose(probs[0], (original + mirrored) / 2, atol=1e-6)
    assert np.allclose(plain.predict_probs([half_and_half])[0], original, atol=1e-6)


def test_tta_changes_nothing_on_a_mirror_symmetric_input(saved_model):
    folder, _ = saved_model
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    symmetric = list((pixel_values + pixel_values.flip(-1)) / 2)
    plain = Predictor.from_pretrained(str(folder), device="cpu").probs_from_pixels(symmetric)
    tta = Predictor.from_pretrained(str(folder), device="cpu", tta=True).probs_from_pixels(symmetric)
    assert np.allclose(plain, tta, atol=1e-6)


def test_cli_tta(saved_model, half_and_half, tmp_path, capsys):
    half_and_half.save(tmp_path / "half.png")
    assert main(["--model", str(saved_model[0]), str(tmp_path / "half.png"), "--format", "json", "--tta"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    expected = Predictor.from_pretrained(str(saved_model[0]), device="cpu", tta=True).predict(tmp_path / "half.png")
    assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert main(["--model", str(saved_model[0]), str(tmp_path / "half.png"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["probabilities"] != pytest.approx(result["probabilities"], abs=1e-5)
