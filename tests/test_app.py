"""The Gradio app: pure parts with hand-made answers, then the served app through gradio_client and raw HTTP."""

import http.client
import json
import runpy
import shutil
import socket
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf import AttrclfError, Predictor
from attrclf import demo as demo_data
from attrclf.ui import (
    ABSENT,
    PRESENT,
    AppSettings,
    build_demo,
    chosen_thresholds,
    example_images,
    launch,
    load_predictor,
    model_markdown,
    present_markdown,
    read_upload,
    relabel,
    result_rows,
)

from .conftest import REPO, write_image

NAMES = ["red", "round", "big"]  # the saved_model fixture's attributes, tuned thresholds 0.3 / 0.5 / 0.7
MAX_FILE_SIZE = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                                  "--threads", "2", "--max-file-size", "5mb"], environ=env)
    assert settings == AppSettings("m", "0.0.0.0", 8000, 3, 2, 64, "5mb", "ex")
    for flags in (["--concurrency", "0"], ["--threads", "0"], ["--queue-size", "0"], ["--examples", "missing"]):
        with pytest.raises(SystemExit):
            AppSettings.parse(flags, environ={})


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
    predictor = Predictor.from_pretrained(str(folder))
    text = model_markdown(predictor, str(folder))
    assert "test_resnet" in text and "mAP n/a" in text and "red 0.30, round 0.50, big 0.70" in text
    (folder / "metrics.json").write_text(json.dumps({"validation": {"mAP": 0.9123, "f1_macro_tuned": 0.8}}))
    assert "mAP 0.912, macro-F1 at the tuned thresholds 0.800" in model_markdown(predictor, str(folder))


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
    demo = build_demo(predictor, folder, status)
    launch(demo, settings, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        yield SimpleNamespace(predictor=predictor, client=client, port=settings.port, folder=folder)
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
