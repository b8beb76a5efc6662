"""The app in a real browser: Debian's chromium driven by playwright against `python app.py` (the real entry point).

Skipped when chromium is missing, except under CI (env CI set), where a missing browser fails the run.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from attrclf import Predictor
from attrclf import demo as demo_data

from .conftest import REPO, free_port, write_image

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_S = 60
pytestmark = pytest.mark.slow  # a subprocess app and a real chromium


def chromium_path() -> str:
    path = shutil.which("chromium")
    missing = None if path else "chromium not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "python playwright not installed (pip install -r requirements.txt)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI is set and the browser test cannot run: {missing}")
    if missing:
        pytest.skip(f"browser test skipped: {missing}")
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_factory):
    """`python app.py` serving a tiny model with the demo's attributes (so the demo examples appear)."""
    executable = chromium_path()
    root = tmp_path_factory.mktemp("browser")
    model = tiny_model_factory(demo_data.LABEL_NAMES)
    model.config.thresholds = [0.5] * len(demo_data.LABEL_NAMES)
    model.eval().save_pretrained(root / "model")
    # what training leaves beside a model: the model panel shows them
    per_attribute = {name: {"ap": 0.5 + 0.05 * i, "threshold": 0.5, "f1": 0.6, "precision": 0.7, "recall": 0.8,
                            "positives": 10 + i, "negatives": 20, "na": 1}
                     for i, name in enumerate(demo_data.LABEL_NAMES)}
    (root / "model" / "metrics.json").write_text(json.dumps({"validation": {"mAP": 0.625, "f1_macro_tuned": 0.6,
                                                                            "per_attribute": per_attribute}}))
    Image.new("RGB", (120, 80), (30, 120, 200)).save(root / "model" / "pr_curves.png")
    port = free_port()
    env = {**os.environ, "ATTRCLF_CACHE": str(root / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", str(root / "model"), "--port",
                                str(port)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        console = wait_for_line(process, "Running on")
        yield {"url": f"http://127.0.0.1:{port}/", "chromium": executable, "root": root, "console": console,
               "predictor": Predictor.from_pretrained(str(root / "model"), device="cpu")}
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_line(process, text: str) -> str:
    lines, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and not any(text in line for line in lines):
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
    console = "".join(lines)
    assert text in console, f"app.py did not start:\n{console}"
    return console


def read_table(page, elem_id: str = "table") -> list[list[str]]:
    """A table's data rows, through its ARIA grid roles (gradio 6 renders a virtual grid, not <td>s)."""
    return page.evaluate("""(id) => Array.from(document.querySelectorAll(`#${id} [role=grid] [role=row][data-index]`))
        .map(row => Array.from(row.querySelectorAll('[role=gridcell]')).map(cell => cell.innerText.trim()))""", elem_id)


def wait_for_table(page, expected: dict, statuses: list[str], step: str) -> list[list[str]]:
    """Poll until the table shows `expected` probabilities (to its 4 decimals) and `statuses`."""
    deadline, rows = time.monotonic() + TIMEOUT_S, []
    while time.monotonic() < deadline:
        rows = read_table(page)
        if (len(rows) == len(expected) and [r[0] for r in rows] == list(expected)
                and all(abs(float(r[1]) - p) < 1e-4 for r, p in zip(rows, expected.values(), strict=True))
                and [r[3] for r in rows] == statuses):
            return rows
        page.wait_for_timeout(200)
    raise AssertionError(f"{step}: table never showed {expected} / {statuses}; last seen {rows}")


def test_upload_read_table_move_threshold_click_example(app, tmp_path):
    from playwright.sync_api import sync_playwright

    predictor = app["predictor"]
    image = write_image(tmp_path / "upload.png", (200, 40, 40), (48, 40))
    expected = predictor.predict(image)
    example = app["root"] / "cache" / f"app-examples-v{demo_data.VERSION}-s64" / "example_1.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=app["chromium"], args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_S * 1000)
            model_runs = []  # the model runs only in the queued /predict event; threshold events skip the queue
            page.on("request", lambda request: model_runs.append(1) if "/queue/join" in request.url else None)
            page.goto(app["url"])
            assert "test_resnet" in page.locator("#model").inner_text()

            page.locator("#image input[type=file]").set_input_files(str(image))

            def status(result):
                return ["PRESENT" if n in result["present"] else "absent" for n in result["probabilities"]]

            rows = wait_for_table(page, expected["probabilities"], status(expected), "upload")
            assert [float(r[2]) for r in rows] == [0.5] * len(rows)
            present = page.locator("#present").inner_text()
            assert present == "Present: " + ", ".join(expected["present"]) if expected["present"] else "none" in present

            page.locator("#threshold input[type=range]").fill("0")  # user input: turns on the global threshold
            wait_for_table(page, expected["probabilities"], ["PRESENT"] * len(rows), "threshold 0")
            assert page.locator("#use-global input[type=checkbox]").is_checked()
            page.locator("#threshold input[type=range]").fill("1")
            wait_for_table(page, expected["probabilities"], ["absent"] * len(rows), "threshold 1")
            page.locator("#use-global input[type=checkbox]").uncheck()  # back to the tuned thresholds
            wait_for_table(page, expected["probabilities"], status(expected), "tuned again")
            assert len(model_runs) == 1, "moving the threshold ran the model again"

            page.locator("#examples button.gallery-item").nth(1).click()
            from_example = predictor.predict(example)
            wait_for_table(page, from_example["probabilities"], status(from_example), "example")
            assert len(model_runs) == 2

            check_heatmap(page, example)
            assert len(model_runs) == 3
            check_many_files(page, predictor, tmp_path, model_runs)
            check_model_panel(page)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {tmp_path / 'app.png'}")


def check_heatmap(page, example) -> None:
    """Pick an attribute, ask for the heatmap: an image of the example's size appears."""
    page.locator("#heatmap-attribute input").click()
    page.get_by_role("option", name="red", exact=True).click()
    page.locator("#heatmap-button").click()
    shown = page.locator("#heatmap img")
    shown.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#heatmap img')?.naturalWidth > 0")
    size = shown.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == list(Image.open(example).size)


def wait_for_files_table(page, check, step: str) -> list[list[str]]:
    deadline, rows = time.monotonic() + TIMEOUT_S, []
    while time.monotonic() < deadline:
        rows = read_table(page, "files-table")
        if rows and check(rows):
            return rows
        page.wait_for_timeout(200)
    raise AssertionError(f"{step}: the files table never matched; last seen {rows}")


def check_many_files(page, predictor, tmp_path, model_runs) -> None:
    """Several files (one broken), then a folder; the global threshold re-labels the table without the model; the
    CSV download holds the table."""
    images = [write_image(tmp_path / "many" / f"{name}.png", colour, (30, 30)) for name, colour in
              [("one", (220, 30, 30)), ("two", (30, 200, 60))]]
    (tmp_path / "many" / "broken.png").write_text("not an image")
    page.locator("#files input[type=file]").set_input_files([str(images[0]), str(tmp_path / "many" / "broken.png"),
                                                            str(images[1])])
    probs = predictor.predict_probs(images)
    names = predictor.label_names

    def labelled(rows, thresholds):
        if [r[0] for r in rows] != ["one.png", "broken.png", "two.png"] or "is not an image" not in rows[1][-1]:
            return False
        return all(row[1:-1] == [f"{'PRESENT' if v >= t else 'absent'} {v:.2f}" for v, t in zip(p, thresholds,
                                                                                                  strict=True)]
                   for row, p in zip([rows[0], rows[2]], probs, strict=True))

    wait_for_files_table(page, lambda rows: labelled(rows, [0.5] * len(names)), "files")
    runs = len(model_runs)
    page.locator("#threshold input[type=range]").fill("0")
    wait_for_files_table(page, lambda rows: labelled(rows, [0.0] * len(names)), "files at threshold 0")
    assert "2 image(s) scored" in page.locator("#files-summary").inner_text()
    assert len(model_runs) == runs, "moving the threshold ran the model on the files again"
    with page.expect_download() as download:
        page.locator("#files-csv").click()
    rows = list(csv.reader(open(download.value.path(), encoding="utf-8")))
    assert [r[0] for r in rows[1:]] == ["one.png", "broken.png", "two.png"]
    assert rows[1][1:1 + len(names)] == ["PRESENT"] * len(names)  # the CSV follows the page's threshold (0)
    page.locator("#use-global input[type=checkbox]").uncheck()

    folder = tmp_path / "folder"
    for k in range(3):
        write_image(folder / f"f{k}.png", (40 * k, 100, 200), (20, 20))
    page.locator("#folder input[type=file]").set_input_files(str(folder))
    wait_for_files_table(page, lambda rows: sorted(Path(r[0]).name for r in rows) == ["f0.png", "f1.png", "f2.png"],
                         "folder")


def check_model_panel(page) -> None:
    panel = page.locator("#model-panel")
    assert "mAP 0.625" in panel.inner_text()
    expected = [[name, f"{0.5 + 0.05 * i:.3f}"] for i, name in enumerate(demo_data.LABEL_NAMES)]
    assert [row[:2] for row in read_table(page, "validation-table")] == expected
    curves = page.locator("#pr-curves img")
    curves.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#pr-curves img')?.naturalWidth > 0")
    assert curves.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [120, 80]
