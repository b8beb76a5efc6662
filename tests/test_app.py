"""The Gradio app: pure parts with hand-made answers, then the served app through gradio_client and raw HTTP."""

import csv
import http.client
import io
import json
import os
import runpy
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf import AttrclfError, Predictor
from attrclf import demo as demo_data
from attrclf.heatmap import feature_map_logits, grad_cam, heatmap, overlay, seen_box
from attrclf.serving import AppSettings, MicroBatcher, load_predictor
from attrclf.ui import (
    ABSENT,
    PRESENT,
    build_demo,
    chosen_thresholds,
    example_images,
    launch,
    present_markdown,
    relabel,
    result_rows,
)
from attrclf.ui_files import FileScore, file_csv, file_table, present_counts, read_upload, score_files
from attrclf.ui_model import model_markdown, read_metrics, read_pr_curves, validation_rows

from .conftest import REPO, free_port, write_image

NAMES = ["red", "round", "big"]  # the saved_model fixture's attributes, tuned thresholds 0.3 / 0.5 / 0.7
MAX_FILE_SIZE = 200_000
BATCH_WAIT_MS = 50  # long enough that parallel requests share a forward pass even on a busy machine


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares width x height pixels: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- pure parts


def test_relabel_table_and_present_list_from_held_probabilities():
    result = relabel([0.2, 0.6, 0.9], NAMES, [0.3, 0.5, 0.7])
    assert result["present"] == ["round", "big"]
    assert result_rows(result) == [
        ["red", 0.2, 0.3, ABSENT], ["round", 0.6, 0.5, PRESENT], ["big", 0.9, 0.7, PRESENT],
    ]
    assert present_markdown(result) == "**Present:** round, big"
    at_095 = relabel([0.2, 0.6, 0.9], NAMES, [0.95] * 3)
    assert at_095["present"] == [] and "none of the attributes" in present_markdown(at_095)
    assert relabel([0.5, 0.5, 0.5], NAMES, [0.5] * 3)["present"] == NAMES  # p >= t counts as present
    assert relabel(None, NAMES, [0.5] * 3) == {} and result_rows({}) == []


def test_read_upload_decodes_like_training_and_refuses_bad_files(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    expected = np.full((20, 20, 3), 255, np.uint8)
    expected[:, :10] = (255, 0, 0)
    assert np.array_equal(np.asarray(read_upload(tmp_path / "rgba.png")), expected)

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((write_image(tmp_path / "ok.png", size=(64, 64))).read_bytes()[:60])
    with pytest.raises(AttrclfError, match=r"'empty.png' is empty \(0 bytes\)"):
        read_upload(tmp_path / "empty.png")
    with pytest.raises(AttrclfError, match="'photo.jpg' is not an image file"):
        read_upload(tmp_path / "text.png", name="photo.jpg")
    with pytest.raises(AttrclfError, match="could not be decoded"):
        read_upload(tmp_path / "cut.png")
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 10  # over PIL's limit (a warning only, up to twice it)
    for width, height in [(side, side), (4 * side, 4 * side)]:
        with pytest.raises(AttrclfError, match="pixels, too many to decode safely"):
            read_upload(png_header_only(tmp_path / "bomb.png", width, height))


def test_settings_flags_beat_environment_and_outputs_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert AppSettings.parse([], environ={}).model is None
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "config.json").write_text("{}")
    assert AppSettings.parse([], environ={}) == AppSettings(model="outputs")
    (tmp_path / "ex").mkdir()
    env = {"ATTRCLF_MODEL": "user/attrclf", "ATTRCLF_EXAMPLES": "ex"}
    assert AppSettings.parse([], environ=env).model == "user/attrclf"
    settings = AppSettings.parse(["--model", "m", "--host", "0.0.0.0", "--port", "8000", "--concurrency", "3",
                                  "--threads", "1", "--max-file-size", "5mb", "--max-batch-size", "4",
                                  "--batch-wait-ms", "10"], environ=env)
    assert settings == AppSettings("m", "0.0.0.0", 8000, 3, 1, 64, "5mb", "ex", 4, 10.0)
    assert AppSettings.parse([], environ={}).backend == "auto"
    assert AppSettings.parse([], environ={"ATTRCLF_BACKEND": "onnx"}).backend == "onnx"
    assert AppSettings.parse(["--backend", "torch"], environ={"ATTRCLF_BACKEND": "onnx"}).backend == "torch"
    for flags in (["--concurrency", "0"], ["--threads", "0"], ["--queue-size", "0"], ["--examples", "missing"],
                  ["--max-batch-size", "0"], ["--batch-wait-ms", "-1"]):
        with pytest.raises(SystemExit):
            AppSettings.parse(flags, environ={})


def test_the_backend_reaches_the_predictor_and_the_console_line(saved_model):
    folder, _ = saved_model
    predictor, message = load_predictor(str(folder), backend="torch")
    assert predictor.backend_name == "torch" and message.endswith("backend torch")
    predictor, message = load_predictor(str(folder), backend="warp-drive")
    assert predictor is None and "Could not load model" in message and "warp-drive" in message


def test_no_model_or_a_bad_one_gives_instructions_not_an_exception(tmp_path):
    predictor, message = load_predictor(None)
    assert predictor is None and "accelerate launch train.py" in message and "ATTRCLF_MODEL" in message
    predictor, message = load_predictor(str(tmp_path / "missing"))
    assert predictor is None and "Could not load model" in message and "accelerate launch train.py" in message
    (tmp_path / "empty").mkdir()
    predictor, message = load_predictor(str(tmp_path / "empty"))
    assert predictor is None and "config.json" in message


def test_model_panel_shows_backbone_and_validation_map(saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model[0], folder)
    config = Predictor.from_pretrained(str(folder)).config
    text = model_markdown(config, str(folder), read_metrics(str(folder)))
    assert "test_resnet" in text and "mAP n/a" in text and "red 0.30, round 0.50, big 0.70" in text
    assert validation_rows(read_metrics(str(folder)), NAMES) == [] and read_pr_curves(str(folder)) is None
    per_attribute = {"red": {"ap": 0.91234, "threshold": 0.3, "f1": 0.8, "precision": 0.75, "recall": None,
                             "positives": 5, "negatives": 7, "na": 1}}
    (folder / "metrics.json").write_text(json.dumps({"validation": {"mAP": 0.9123, "f1_macro_tuned": 0.8,
                                                                    "per_attribute": per_attribute}}))
    metrics = read_metrics(str(folder))
    assert "mAP 0.912, macro-F1 at the tuned thresholds 0.800" in model_markdown(config, str(folder), metrics)
    assert validation_rows(metrics, NAMES) == [["red", "0.912", "0.300", "0.800", "0.750", "n/a", 5, 7, 1]]
    Image.new("RGB", (40, 30), (10, 200, 10)).save(folder / "pr_curves.png")
    curves = read_pr_curves(str(folder))
    assert curves.size == (40, 30) and curves.getpixel((5, 5)) == (10, 200, 10)


def test_examples_are_generated_for_the_demo_model_only(tmp_path):
    examples = example_images(demo_data.LABEL_NAMES, None)
    assert [caption for _, caption in examples][:2] == ["outlined, red, large, dark_background", "striped, dot"]
    first = Path(examples[0][0]).read_bytes()
    assert Image.open(examples[0][0]).size == (64, 64)
    assert example_images(demo_data.LABEL_NAMES, None) == examples and Path(examples[0][0]).read_bytes() == first
    assert example_images(NAMES, None) == []
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert example_images(NAMES, str(tmp_path)) == [(str(tmp_path / "a.jpg"), "a"), (str(tmp_path / "b.png"), "b")]


# ---------------------------------------------------------------- the served app


@pytest.fixture(scope="module")
def served(saved_model):
    """The app on a free port with the tiny saved model, and a gradio_client on it."""
    from gradio_client import Client

    folder = str(saved_model[0])
    predictor, status = load_predictor(folder)
    settings = AppSettings(model=folder, host="127.0.0.1", port=free_port(), max_file_size=f"{MAX_FILE_SIZE}b")
    demo = build_demo(predictor, folder, status, batch_wait_ms=BATCH_WAIT_MS)
    launch(demo, settings, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        yield SimpleNamespace(predictor=predictor, client=client, port=settings.port, folder=folder,
                              batcher=demo.scorer.batcher)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Images in awkward formats, each with an equivalent plain-RGB twin that must give the same probabilities."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "rgb.png")
    rgba = np.dstack([pixels, np.full((30, 44), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # transparent left part: white once composited
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    white_left = pixels.copy()
    white_left[:, :20] = 255
    Image.fromarray(white_left).save(folder / "rgba_twin.png")
    gray = pixels[..., 0]
    Image.fromarray(gray, "L").save(folder / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")  # 16-bit: v * 257 -> v
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(folder / "exif.jpg", exif=exif, quality=95)
    Image.open(folder / "exif.jpg").transpose(Image.Transpose.ROTATE_270).save(folder / "exif_twin.png")
    return folder


def api_predict(client, path, *thresholds):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), *thresholds, api_name="/predict")


@pytest.mark.parametrize("name,twin", [("rgb.png", "rgb.png"), ("rgba.png", "rgba_twin.png"), ("gray.png", "gray.png"),
                                       ("gray16.png", "gray.png"), ("cmyk.jpg", "cmyk.jpg"),
                                       ("exif.jpg", "exif_twin.png")])
def test_api_gives_every_attribute_as_predictor_does(served, odd_images, name, twin):
    predictor, client = served.predictor, served.client
    result = api_predict(client, odd_images / name)
    expected = predictor.predict(odd_images / twin)
    assert list(result["probabilities"]) == NAMES
    assert list(result["probabilities"].values()) == pytest.approx(list(expected["probabilities"].values()), abs=1e-6)
    assert result["thresholds"] == {"red": 0.3, "round": 0.5, "big": 0.7}
    assert result["present"] == expected["present"]


def test_exif_orientation_matters_to_this_model(served, odd_images):
    """So the EXIF case above can fail: ignoring the orientation would change the answer."""
    predictor = served.predictor
    rotated = predictor.predict(odd_images / "exif_twin.png")["probabilities"]
    raw_pixels = Image.fromarray(np.asarray(Image.open(odd_images / "exif.jpg")))  # the same pixels, no EXIF
    raw = predictor.predict(raw_pixels)["probabilities"]
    assert not np.allclose(list(rotated.values()), list(raw.values()), atol=1e-5)


def test_api_refuses_a_global_threshold_that_is_not_a_probability(served, odd_images):
    from gradio_client.exceptions import AppError

    for bad in (1.5, -0.1):
        with pytest.raises(AppError, match="between 0 and 1"):
            api_predict(served.client, odd_images / "rgb.png", True, bad)
    with pytest.raises(AttrclfError, match="must be a number between 0 and 1 \\(got 'half'\\)"):
        chosen_thresholds(served.predictor, True, "half")
    assert chosen_thresholds(served.predictor, False, "ignored") == [0.3, 0.5, 0.7]


def test_api_global_threshold(served, odd_images):
    predictor, client = served.predictor, served.client
    probs = list(predictor.predict(odd_images / "rgb.png")["probabilities"].values())
    assert api_predict(client, odd_images / "rgb.png", True, 0.0)["present"] == NAMES
    at_one = [n for n, p in zip(NAMES, probs, strict=True) if p >= 1]
    assert api_predict(client, odd_images / "rgb.png", True, 1.0)["present"] == at_one
    middle = float(np.median(probs))
    result = api_predict(client, odd_images / "rgb.png", True, middle)
    assert result["thresholds"] == dict.fromkeys(NAMES, middle)
    assert result["present"] == [n for n, p in zip(NAMES, probs, strict=True) if p >= middle]
    assert 1 <= len(result["present"]) <= 2


def test_bad_uploads_get_clear_errors_and_the_server_keeps_serving(served, odd_images, tmp_path):
    from gradio_client.exceptions import AppError

    predictor, client = served.predictor, served.client
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "<img src=x onerror=alert(1)>.png").write_text("html in the name")
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    cases = {"notes.png": "is not an image file", "empty.jpg": "is empty (0 bytes)", "bomb.png": "too many to decode",
             "<img src=x onerror=alert(1)>.png": "onerror=alert(1)"}  # gradio drops < > from upload names
    for name, message in cases.items():
        with pytest.raises(AppError) as error:
            api_predict(client, tmp_path / name)
        assert message in str(error.value) and "<img" not in str(error.value)
    expected = predictor.predict(odd_images / "rgb.png")["probabilities"]
    assert api_predict(client, odd_images / "rgb.png")["probabilities"] == pytest.approx(expected, abs=1e-6)


def test_error_messages_escape_html_in_file_names(tmp_path):
    """gr.Error messages are shown as HTML; a file name is the user's text."""
    import gradio as gr

    from attrclf.ui import uploaded_image

    (tmp_path / "upload").write_text("not an image")
    with pytest.raises(gr.Error) as error:
        uploaded_image({"path": str(tmp_path / "upload"), "orig_name": "<b>x</b>.png"})
    assert error.value.message.startswith("'&lt;b&gt;x&lt;/b&gt;.png' is not an image file")
    assert uploaded_image(None) is None


def test_uploads_over_the_size_limit_are_refused(served, odd_images, tmp_path):
    import httpx

    client, port = served.client, served.port
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_FILE_SIZE
    with open(big, "rb") as f:
        response = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": f})
    assert response.status_code == 413
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        api_predict(client, big)
    assert list(api_predict(client, odd_images / "rgb.png")["probabilities"]) == NAMES


TRAVERSAL_PROBES = [
    "/file=../../../../../../etc/passwd",
    "/file=/etc/passwd",
    "/gradio_api/file=/etc/passwd",
    "/gradio_api/file=../../../../../../etc/passwd",
    "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=%252Fetc%252Fpasswd",
    "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=....//....//....//....//etc/passwd",
    "/gradio_api/file=/proc/self/environ",
    "/gradio_api/file/../../../../../../etc/passwd",
    "/gradio_api/file/%2Fetc%2Fpasswd",
    "/gradio_api/file/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=file:///etc/passwd",
    "/gradio_api/proxy=/etc/passwd",
    "/static/../../../../../../etc/passwd",
    "/static/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/assets/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/svelte/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=app.py",
    "/gradio_api/file={repo}/app.py",
    "/gradio_api/file={model}/config.json",
    "/gradio_api/file={secret}",
    "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..{secret}",
]


def test_path_traversal_probes_get_no_file_content(served, tmp_path):
    """Raw requests (http.client sends the path as written: no normalising of ../ or %2e)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("attrclf-canary-7f3a")
    forbidden = [b"root:x:0:0", b"attrclf-canary-7f3a", b"PATH=", b"Wiring only", b"label_names"]
    for probe in TRAVERSAL_PROBES:
        path = probe.format(repo=REPO, model=served.folder, secret=secret)
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert not any(token in body for token in forbidden), f"{path} returned file content"
        assert response.status != 200 or b"<!doctype html>" in body.lower()[:200], f"{path}: {response.status}"


def test_a_forged_file_payload_cannot_make_the_app_read_a_server_file(served):
    """The API takes a file reference; one that points outside gradio's upload folder must be refused."""
    import httpx

    base = f"http://127.0.0.1:{served.port}/gradio_api/call/predict"
    for forged in [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, {"path": "/etc/passwd"},
                   {"path": "../../../../etc/passwd", "meta": {"_type": "gradio.FileData"}},
                   {"url": "file:///etc/passwd", "meta": {"_type": "gradio.FileData"}}]:
        response = httpx.post(base, json={"data": [forged, False, 0.5]})
        if response.status_code == 200:
            response = httpx.get(f"{base}/{response.json()['event_id']}", timeout=30)
        assert b"root:x:0:0" not in response.content
        assert b"event: complete" not in response.content, forged


def test_app_py_without_a_model_serves_a_page_that_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    """app.py's module-level wiring, run as a script would be (runpy, without its __main__ launch): the console and
    the page both explain; nothing raises. The browser test runs `python app.py` itself."""
    import httpx

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTRCLF_MODEL", str(tmp_path / "nowhere"))
    threads = torch.get_num_threads()
    try:
        demo = runpy.run_path(str(REPO / "app.py"), run_name="app")["demo"]
    finally:
        torch.set_num_threads(threads)  # app.py sets the serving thread count for the whole process
    console = capsys.readouterr().out
    assert "Could not load model" in console and "accelerate launch train.py" in console
    port = free_port()
    launch(demo, AppSettings(host="127.0.0.1", port=port), prevent_thread_lock=True, quiet=True)
    try:
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).text
    finally:
        demo.close()
    assert "No model loaded" in config and "accelerate launch train.py" in config and "ATTRCLF_MODEL" in config


# ---------------------------------------------------------------- batching, many files, heatmaps


def test_micro_batcher_batches_parallel_calls_and_answers_each_its_own():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        if "fail" in items:
            raise ValueError("bad batch")
        return [item * 2 for item in items]

    batcher = MicroBatcher(run_batch, max_batch_size=4, wait_s=0.2)
    answers, barrier = {}, threading.Barrier(6)

    def call(k):
        barrier.wait()
        answers[k] = batcher(k)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {k: 2 * k for k in range(6)}
    assert sorted(len(c) for c in calls) == [2, 4] and batcher.batch_sizes == [len(c) for c in calls]
    with pytest.raises(ValueError, match="bad batch"):
        batcher("fail")
    assert batcher(21) == 42  # the worker survives a failed batch


def test_many_files_table_csv_and_summary_follow_the_thresholds(saved_model, tmp_path):
    predictor = Predictor.from_pretrained(str(saved_model[0]))
    good = [write_image(tmp_path / f"{name}.png", colour, (30, 20)) for name, colour in
            [("red", (220, 20, 20)), ("blue", (20, 20, 220))]]
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    records = [(str(good[0]), "red.png"), (str(tmp_path / "notes.png"), "notes.png"), (str(good[1]), "blue.png"),
               (str(tmp_path / "empty.png"), "empty.png")]
    scores = score_files(predictor, records)
    expected = predictor.predict_probs(good)
    assert [s.name for s in scores] == ["red.png", "notes.png", "blue.png", "empty.png"]
    assert scores[0].probs == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert scores[2].probs == pytest.approx(expected[1].tolist(), abs=1e-6)
    assert "is not an image file" in scores[1].error and "is empty (0 bytes)" in scores[3].error
    assert scores[0].error is None and scores[1].probs is None

    fixed = [FileScore("a.png", [0.2, 0.6, 0.9]), FileScore("b.png", error="'b.png' is empty")]
    assert file_table(fixed, NAMES, [0.3, 0.5, 0.7]) == [
        ["a.png", "absent 0.20", "PRESENT 0.60", "PRESENT 0.90", ""], ["b.png", "", "", "", "'b.png' is empty"]]
    assert file_table(fixed, NAMES, [0.1] * 3)[0][1:4] == ["PRESENT 0.20", "PRESENT 0.60", "PRESENT 0.90"]
    rows = list(csv.reader(io.StringIO(file_csv(fixed, NAMES, [0.3, 0.5, 0.7]))))
    assert rows == [["image", *NAMES, *[f"{n} probability" for n in NAMES], "error"],
                    ["a.png", ABSENT, PRESENT, PRESENT, "0.200000", "0.600000", "0.900000", ""],
                    ["b.png", "", "", "", "", "", "", "'b.png' is empty"]]
    assert present_counts(fixed, NAMES, [0.3, 0.5, 0.7]) == (
        "**1 image(s) scored**, **1 could not be used** (see Message). Present: red 0, round 1, big 1")


def tiny_cam_model(tiny_model_factory, geometry: str = "whole"):
    model = tiny_model_factory(NAMES, image_size=64).eval()  # test_resnet at 64 px: a 2x2 feature map
    if geometry == "crop":
        model.config.crop_mode, model.config.crop_pct = "center", 0.5
    return model


def half_and_half(size=(90, 60)) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (230, 30, 30)
    pixels[:, size[0] // 2 :] = (30, 60, 200)
    return Image.fromarray(pixels)


def test_grad_cam_equals_the_hand_computed_map_and_the_model_logits(tiny_model_factory):
    model = tiny_cam_model(tiny_model_factory)
    pixel_values = Predictor(model).preprocess(half_and_half()).unsqueeze(0)
    fmap, logits = feature_map_logits(model, pixel_values)
    assert torch.allclose(logits, model(pixel_values), atol=1e-5)  # the CAM path is the model's own forward
    # By hand: the MLP head reads average-pooled features, so d logit / d A_c(h, w) = d logit / d pooled_c / (h w)
    pooled = fmap.detach().mean(dim=(2, 3)).requires_grad_(True)
    for attribute in range(len(NAMES)):
        (d_pooled,) = torch.autograd.grad(model.head(pooled)[0, attribute], pooled)
        weights = d_pooled[0] / (fmap.shape[2] * fmap.shape[3])
        by_hand = torch.relu((weights[:, None, None] * fmap[0].detach()).sum(0))
        by_hand = by_hand / by_hand.max() if by_hand.max() > 0 else by_hand
        assert np.allclose(grad_cam(model, pixel_values, attribute), by_hand.numpy(), atol=1e-5)


def test_heatmap_has_the_image_size_is_not_constant_and_stays_in_the_seen_box(tiny_model_factory):
    image = half_and_half()
    model = tiny_cam_model(tiny_model_factory)
    maps = [heatmap(model, Predictor(model).preprocess(image), image, a) for a in range(len(NAMES))]
    assert all(m.shape == (60, 90) and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert any(m.max() - m.min() > 0.2 for m in maps)  # a map that is the same everywhere shows nothing
    shown = overlay(image, maps[0])
    assert shown.size == image.size and not np.array_equal(np.asarray(shown), np.asarray(image))

    cropped = tiny_cam_model(tiny_model_factory, "crop")  # the model sees the centre half: nothing outside it
    left, top, right, bottom = seen_box(cropped.config, 90, 60)
    assert (left, top, right, bottom) == (30, 15, 60, 45)
    crop_maps = [heatmap(cropped, Predictor(cropped).preprocess(image), image, a) for a in range(len(NAMES))]
    for m in crop_maps:
        inside = m[top:bottom, left:right]
        assert m.shape == (60, 90) and m.sum() == pytest.approx(inside.sum())


def test_parallel_requests_are_batched_and_each_gets_its_own_image(served, tmp_path):
    """8 users at once, each with a differently coloured image: the forward passes are shared (batches of more than
    one), yet every answer is its own image's."""
    from gradio_client import Client, handle_file

    colours = [(255 - 30 * k, 30 * k, (90 * k) % 256) for k in range(8)]
    images = [write_image(tmp_path / f"colour_{k}.png", colour, (40, 40)) for k, colour in enumerate(colours)]
    expected = served.predictor.predict_probs(images)
    assert min(np.abs(a - b).max() for i, a in enumerate(expected) for b in expected[i + 1 :]) > 1e-4  # all differ
    clients = [Client(f"http://127.0.0.1:{served.port}/", verbose=False) for _ in images]
    answers, barrier = {}, threading.Barrier(len(images))
    before = len(served.batcher.batch_sizes)

    def user(k):
        barrier.wait()
        answers[k] = clients[k].predict(handle_file(str(images[k])), api_name="/predict")

    threads = [threading.Thread(target=user, args=(k,)) for k in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, probs in enumerate(expected):
        assert list(answers[k]["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5), k
    sizes = served.batcher.batch_sizes[before:]
    assert sum(sizes) == len(images) and max(sizes) > 1, sizes


def test_api_scores_many_files_with_a_message_for_each_bad_one(served, tmp_path):
    from gradio_client import handle_file

    predictor, client = served.predictor, served.client
    good = [write_image(tmp_path / "r.png", (220, 20, 20), (30, 30)), write_image(tmp_path / "g.jpg", (20, 200, 20))]
    (tmp_path / "broken.png").write_text("not an image")
    files = [good[0], tmp_path / "broken.png", good[1]]
    table, summary, csv_path = client.predict([handle_file(str(p)) for p in files], False, 0.5,
                                              api_name="/predict_files")
    probs = predictor.predict_probs(good)
    assert table["headers"] == ["Image", *NAMES, "Message"]
    assert [row[0] for row in table["data"]] == ["r.png", "broken.png", "g.jpg"]
    assert "'broken.png' is not an image file" in table["data"][1][-1] and table["data"][1][1:-1] == [""] * 3
    for row, p in zip([table["data"][0], table["data"][2]], probs, strict=True):
        assert row[1:-1] == [f"{PRESENT if v >= t else ABSENT} {v:.2f}" for v, t in zip(p, [0.3, 0.5, 0.7],
                                                                                         strict=True)]
    assert "2 image(s) scored" in summary and "1 could not be used" in summary
    rows = list(csv.reader(open(csv_path, encoding="utf-8")))
    assert [r[0] for r in rows[1:]] == ["r.png", "broken.png", "g.jpg"]
    assert [float(v) for v in rows[1][4:7]] == pytest.approx(probs[0].tolist(), abs=1e-6)
    everything = client.predict([handle_file(str(p)) for p in good], True, 0.0, api_name="/predict_files")[0]
    assert all(cell.startswith(PRESENT) for row in everything["data"] for cell in row[1:-1])


def test_api_heatmap_has_the_upload_size_and_refuses_unknown_attributes(served, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    upload = tmp_path / "halves.png"
    half_and_half((70, 50)).save(upload)
    shown = Image.open(served.client.predict(handle_file(str(upload)), "round", api_name="/heatmap"))
    assert shown.size == (70, 50)
    assert not np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(Image.open(upload).convert("RGB")))
    with pytest.raises(AppError, match="attribute must be one of red, round, big"):
        served.client.predict(handle_file(str(upload)), "colour", api_name="/heatmap")


@pytest.mark.slow  # a fresh interpreter imports torch and gradio and serves: 30-120 s on 2 busy cores
def test_serving_app_py_imports_no_datasets_accelerate_or_matplotlib(saved_model, tmp_path):
    """The whole serving path in a fresh interpreter: app.py's wiring, the server, one answer from each endpoint."""
    write_image(tmp_path / "probe.png")
    code = f"""
import json, runpy, sys
from gradio_client import Client, handle_file
from attrclf.ui import launch
namespace = runpy.run_path({str(REPO / "app.py")!r}, run_name="app")
namespace["settings"].port = {free_port()}
launch(namespace["demo"], namespace["settings"], prevent_thread_lock=True, quiet=True)
client = Client(f"http://127.0.0.1:{{namespace['settings'].port}}/", verbose=False)
image = handle_file({str(tmp_path / "probe.png")!r})
client.predict(image, api_name="/predict")
client.predict([image], False, 0.5, api_name="/predict_files")
client.predict(image, "red", api_name="/heatmap")
heavy = [m for m in ("datasets", "accelerate", "matplotlib") if m in sys.modules]
namespace["demo"].close()
print("HEAVY", json.dumps(heavy))
"""
    env = {**os.environ, "ATTRCLF_MODEL": str(saved_model[0]), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = [line for line in result.stdout.splitlines() if line.startswith("HEAVY ")]
    assert heavy and json.loads(heavy[-1][len("HEAVY "):]) == []
