"""The screenshot of the app in the README (docs/app.png): `python app.py` with a trained model, driven by chromium.

    python benchmarks/app_screenshot.py --model outputs --out docs/app.png

Clicks a demo example, shows the heatmap of one attribute, scores a few demo images at once, and saves the page
(a palette PNG, to stay small). Needs Debian's chromium and Python playwright, as tests/test_browser.py does.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_app import free_port  # noqa: E402
from tests.test_browser import CHROMIUM_ARGS, wait_for_line  # noqa: E402


def demo_files(folder: Path, count: int = 4) -> list[str]:
    from attrclf import demo

    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        path = folder / f"demo_{i}.png"
        demo.draw_example(rng, {name: int(rng.random() < 0.5) for name in demo.LABEL_NAMES}, 64).save(path)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "app.png")
    parser.add_argument("--attribute", default="red")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", args.model, "--port", str(port)],
                                  cwd=REPO, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_line(server, "Running on")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(120_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.locator("#examples button.gallery-item").nth(0).click()
                page.wait_for_function("() => document.querySelectorAll('#table [role=row][data-index]').length")
                page.locator("#heatmap-attribute input").click()
                page.get_by_role("option", name=args.attribute, exact=True).click()
                page.locator("#heatmap-button").click()
                page.wait_for_function("() => document.querySelector('#heatmap img')?.naturalWidth > 0")
                page.locator("#files input[type=file]").set_input_files(demo_files(Path(folder)))
                page.wait_for_function("() => document.querySelectorAll('#files-table [role=row][data-index]')"
                                       ".length == 4")
                page.wait_for_timeout(500)
                raw = Path(folder) / "page.png"
                page.screenshot(path=str(raw), full_page=True)
                browser.close()
            image = Image.open(raw).convert("RGB")
            image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
            print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {image.width}x{image.height})")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
