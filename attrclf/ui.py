"""The Gradio app: upload an image, see every attribute's probability, move the thresholds without re-running the model.

app.py is the wiring: `AppSettings.parse()` -> `build_app` (`load_predictor` + `build_demo`) -> `launch`; `attrclf app`
runs the same through `main(argv)`. Everything that decides what the page shows is a plain function here
(`read_upload`, `relabel`, `result_rows`, `present_markdown`, `model_markdown`, `example_images`), tested without a
server.
"""

import argparse
import html
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import demo as demo_data
from .errors import AttrclfError
from .images import IMAGE_SUFFIXES, load_image
from .predict import Predictor, apply_thresholds

TABLE_HEADERS = ["Attribute", "Probability", "Threshold", "Status"]
PRESENT, ABSENT = "PRESENT", "absent"
HOW_TO_GET_A_MODEL = (
    "Train the demo model with `accelerate launch train.py` (it writes `outputs/`, which the app serves by default), "
    "or set `ATTRCLF_MODEL` to a model folder or a Hub id (`user/name`), or pass `--model`."
)
# The demo's attributes for each generated example, and the caption shown under it.
DEMO_EXAMPLES = [
    {"outlined": 1, "red": 1, "striped": 0, "large": 1, "dark_background": 1, "dot": 0},
    {"outlined": 0, "red": 0, "striped": 1, "large": 0, "dark_background": 0, "dot": 1},
    {"outlined": 1, "red": 0, "striped": 0, "large": 0, "dark_background": 0, "dot": 0},
    {"outlined": 0, "red": 1, "striped": 1, "large": 1, "dark_background": 1, "dot": 1},
]
EXAMPLE_SIZE = 64  # the demo images' own size: the demo model has seen nothing else


@dataclass
class AppSettings:
    """How the app is served. Flags win over environment variables, which win over defaults.

    Attributes:
        model: Model folder or Hub id; None when there is none (the page then says how to get one).
        host: Server address (None: gradio's GRADIO_SERVER_NAME, else 127.0.0.1; "0.0.0.0" to listen on the network).
        port: Server port (None: gradio's GRADIO_SERVER_PORT, else the first free port from 7860).
        concurrency: Predictions run at the same time; more requests wait in the queue.
        threads: torch threads per prediction (concurrency x threads should not exceed the cores: threads that
            wait on each other make a 5 ms prediction take 100s of ms).
        queue_size: Requests that may wait; beyond it users are told the queue is full.
        max_file_size: Largest upload gradio accepts ("10mb").
        examples: Folder of example images (None: generated demo examples when the model is the demo's).
    """

    model: str | None = None
    host: str | None = None
    port: int | None = None
    concurrency: int = 2
    threads: int = 1
    queue_size: int = 64
    max_file_size: str = "10mb"
    examples: str | None = None

    @classmethod
    def parse(cls, argv: list[str] | None = None, environ=None) -> "AppSettings":
        """Settings from flags (`argv`) and environment variables (ATTRCLF_MODEL, ATTRCLF_EXAMPLES)."""
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(prog="python app.py", description="Serve an attrclf model in a web page.")
        parser.add_argument("--model", default=environ.get("ATTRCLF_MODEL") or default_model(),
                            help="model folder or Hub id (default: $ATTRCLF_MODEL, else outputs/ if it exists)")
        parser.add_argument("--host", default=None,
                            help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
        parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
        parser.add_argument("--concurrency", type=int, default=cls.concurrency, help="predictions run at once")
        parser.add_argument("--threads", type=int, default=cls.threads, help="torch threads per prediction")
        parser.add_argument("--queue-size", type=int, default=cls.queue_size, help="requests that may wait")
        parser.add_argument("--max-file-size", default=cls.max_file_size, help="largest upload, e.g. 10mb")
        parser.add_argument("--examples", default=environ.get("ATTRCLF_EXAMPLES"),
                            help="folder of example images (default: $ATTRCLF_EXAMPLES, else demo examples)")
        args = parser.parse_args([] if argv is None else argv)
        if min(args.concurrency, args.threads, args.queue_size) < 1:
            parser.error("--concurrency, --threads and --queue-size must be at least 1")
        if args.examples and not os.path.isdir(args.examples):
            parser.error(f"--examples / ATTRCLF_EXAMPLES: '{args.examples}' is not a folder of images")
        return cls(**vars(args))


def default_model() -> str | None:
    """The quickstart's output folder when it exists."""
    return "outputs" if os.path.isfile(os.path.join("outputs", "config.json")) else None


def load_predictor(model: str | None, threads: int | None = None) -> tuple[Predictor | None, str]:
    """(predictor, a line for the console). No model, or one that does not load: (None, what to do).

    Args:
        model: Model folder or Hub id.
        threads: Set torch's (process-wide) thread count for serving; None leaves it alone.
    """
    if threads:
        torch.set_num_threads(threads)
    if not model:
        return None, f"No model to serve. {HOW_TO_GET_A_MODEL}"
    try:
        predictor = Predictor.from_pretrained(model)
    except AttrclfError as e:
        return None, f"Could not load model '{model}': {e}\n{HOW_TO_GET_A_MODEL}"
    names = predictor.label_names
    return predictor, f"Serving '{model}': {predictor.config.backbone}, {len(names)} attributes ({', '.join(names)})"


# ---------------------------------------------------------------- pure parts of the page


def read_upload(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """An uploaded file as RGB, decoded like training decodes it (attrclf.images.load_image: EXIF, alpha, 16-bit, CMYK).

    Raises:
        AttrclfError: empty file, not an image, or more pixels than PIL's MAX_IMAGE_PIXELS (a decompression bomb).
    """
    name = name or Path(path).name
    fix = "Upload a PNG, JPEG, WebP, BMP, GIF or TIFF image."
    if os.path.getsize(path) == 0:
        raise AttrclfError(f"'{name}' is empty (0 bytes). {fix}")
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it; this refuses instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                width, height = probe.size
        if width * height <= Image.MAX_IMAGE_PIXELS:
            return load_image(path)
    except Image.DecompressionBombError:  # PIL refuses over twice its limit while reading the header
        pass
    except UnidentifiedImageError:
        raise AttrclfError(f"'{name}' is not an image file that can be read. {fix}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise AttrclfError(f"'{name}' could not be decoded ({e}). {fix}") from None
    raise AttrclfError(
        f"'{name}' has more than {Image.MAX_IMAGE_PIXELS:,} pixels, too many to decode safely "
        f"(a decompression bomb, or a huge photo). Resize it and upload it again."
    )


def chosen_thresholds(predictor: Predictor, use_global: bool, global_threshold: float) -> list[float]:
    """The model's tuned per-attribute thresholds, or `global_threshold` for every attribute (API callers may send
    anything: a clear AttrclfError unless it is a number from 0 to 1)."""
    if not use_global:
        return predictor.thresholds(None)
    try:
        return predictor.thresholds(float(global_threshold))
    except (TypeError, ValueError):
        raise AttrclfError(f"global_threshold must be a number between 0 and 1 (got {global_threshold!r})") from None


def relabel(probs: list[float] | None, label_names: list[str], thresholds: list[float]) -> dict:
    """The result for held probabilities at new thresholds ({} before any image): no model call."""
    if probs is None:
        return {}
    return apply_thresholds(np.asarray(probs), label_names, thresholds)


def result_rows(result: dict) -> list[list]:
    """One table row per attribute: name, probability, threshold, PRESENT / absent."""
    if not result:
        return []
    return [
        [name, round(p, 4), round(result["thresholds"][name], 4), PRESENT if name in result["present"] else ABSENT]
        for name, p in result["probabilities"].items()
    ]


def present_markdown(result: dict) -> str:
    if not result:
        return "Upload an image (or click an example) to see its attributes."
    if not result["present"]:
        return "**Present:** none of the attributes at these thresholds."
    return "**Present:** " + ", ".join(result["present"])


def model_markdown(predictor: Predictor, model: str) -> str:
    """The model panel: where it comes from, backbone, input size, attributes and validation scores when known."""
    config = predictor.config
    metrics = read_metrics(model)
    validation = metrics.get("validation", {})
    score = {key: "n/a" if validation.get(key) is None else f"{validation[key]:.3f}"
             for key in ("mAP", "f1_macro_tuned")}
    lines = [
        (f"**Model** `{model}`: {config.backbone}, input {config.input_size[1]}x{config.input_size[2]} px, "
         f"{len(config.label_names)} attributes."),
        (f"**Validation** mAP {score['mAP']}, macro-F1 at the tuned thresholds {score['f1_macro_tuned']}"
         + ("" if metrics else " (no metrics.json beside the model)") + "."),
        "**Tuned thresholds:** "
        + ", ".join(f"{n} {t:.2f}" for n, t in zip(config.label_names, config.thresholds, strict=True)),
    ]
    return "\n\n".join(lines)


def read_metrics(model: str) -> dict:
    """metrics.json beside a model folder or in its Hub repo; {} when there is none or it cannot be read."""
    try:
        if os.path.isdir(model):
            path = os.path.join(model, "metrics.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "metrics.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # missing file, offline, no such repo file (OSErrors), bad JSON: the panel says n/a
        return {}


def example_images(label_names: list[str], folder: str | None) -> list[tuple[str, str]]:
    """(path, caption) of the clickable examples: the images in `folder`, else generated demo images for a model
    trained on the demo, else none."""
    if folder:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(str(p), p.stem) for p in paths]
    if list(label_names) != demo_data.LABEL_NAMES:
        return []
    cache = demo_data.default_root(0, EXAMPLE_SIZE).parent
    folder = write_demo_examples(cache / f"app-examples-v{demo_data.VERSION}-s{EXAMPLE_SIZE}")
    captions = [", ".join(n for n, v in attributes.items() if v) for attributes in DEMO_EXAMPLES]
    return [(str(folder / f"example_{i}.png"), caption) for i, caption in enumerate(captions)]


def write_demo_examples(folder: Path) -> Path:
    """Draw DEMO_EXAMPLES with the demo's generator (seeded) into `folder`, once; each file written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, attributes in enumerate(DEMO_EXAMPLES):
        image = demo_data.draw_example(rng, attributes, EXAMPLE_SIZE)
        target = folder / f"example_{i}.png"
        if not target.is_file():
            partial = folder / f".example_{i}.{os.getpid()}.png"
            image.save(partial)
            partial.replace(target)
    return folder


# ---------------------------------------------------------------- gradio


def uploaded_image(upload: dict | None) -> Image.Image | None:
    """The image of a gr.Image upload record, decoded by `read_upload`; a file it cannot use is a gr.Error that the
    user sees (the server goes on serving). gradio has already checked that the path lies in its upload folder."""
    if not upload:
        return None
    if not upload.get("path"):
        raise gr.Error("Send the image as an uploaded file.", print_exception=False)
    try:
        return read_upload(upload["path"], upload.get("orig_name"))
    except AttrclfError as e:  # gradio shows messages as HTML: escape the user's file name
        raise gr.Error(html.escape(str(e), quote=False), title="Cannot use this file", print_exception=False) from None


def build_demo(predictor: Predictor | None, model: str | None, status: str, examples_folder: str | None = None):
    """The page. Without a predictor, a page that says why and how to get a model."""
    with gr.Blocks(title="attrclf", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# attrclf: image attributes\nEvery attribute is scored on its own: an image can have any number.")
        if predictor is None:
            gr.Markdown(f"### No model loaded\n\n{status}", elem_id="no-model")
            return demo
        _model_page(predictor, model, examples_folder)
    return demo


def _model_page(predictor: Predictor, model: str, examples_folder: str | None) -> None:
    names = predictor.label_names
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=320,
                             label="Image (upload, paste or drop)", elem_id="image")
            use_global = gr.Checkbox(label="Use one threshold for every attribute (instead of the model's tuned ones)",
                                     elem_id="use-global")
            threshold = gr.Slider(0, 1, value=0.5, step=0.01, label="Global threshold", elem_id="threshold")
            examples = example_images(names, examples_folder)
            if examples:
                gr.Examples([[p] for p, _ in examples], inputs=[image], example_labels=[c for _, c in examples],
                            label="Examples (click one)", elem_id="examples")
        with gr.Column():
            present = gr.Markdown(present_markdown({}), elem_id="present")
            table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "number", "number", "str"],
                                 interactive=False, label="Every attribute", elem_id="table")
            label = gr.Label(num_top_classes=len(names), show_heading=False, label="Probabilities", elem_id="label")
            with gr.Accordion("API result (JSON)", open=False):
                result = gr.JSON(elem_id="result")
    gr.Markdown(model_markdown(predictor, model), elem_id="model")
    probs = gr.State()
    _wire(predictor, image, use_global, threshold, probs, result, (present, table, label))


def _wire(predictor: Predictor, image, use_global, threshold, probs, result, views) -> None:
    """Events. The model runs only when the image changes; threshold moves re-label the probabilities held in
    `probs`."""
    names = predictor.label_names

    def predict(image: dict | None, use_global_threshold: bool = False, global_threshold: float = 0.5):
        """Every attribute's probability, the thresholds used and the attributes present."""
        try:
            thresholds = chosen_thresholds(predictor, use_global_threshold, global_threshold)
        except AttrclfError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
        decoded = uploaded_image(image)
        if decoded is None:
            return None, {}
        image_probs = predictor.predict_probs([decoded])[0].tolist()
        return image_probs, relabel(image_probs, names, thresholds)

    def rethreshold(image_probs, use_global_threshold: bool, global_threshold: float):
        return relabel(image_probs, names, chosen_thresholds(predictor, use_global_threshold, global_threshold))

    def slide(image_probs, global_threshold: float):
        return True, rethreshold(image_probs, True, global_threshold)

    def show(shown: dict):
        return present_markdown(shown), result_rows(shown), shown.get("probabilities", {}) if shown else {}

    # preprocess=False: `predict` gets gradio's checked upload record and decodes it itself (uploaded_image), so an
    # unreadable file is a clear message rather than gr.Image's generic decoding error.
    image.change(predict, [image, use_global, threshold], [probs, result], api_name="predict", preprocess=False)
    use_global.input(rethreshold, [probs, use_global, threshold], result, queue=False, api_visibility="private")
    threshold.input(slide, [probs, threshold], [use_global, result], queue=False, trigger_mode="always_last",
                    api_visibility="private")
    result.change(show, result, list(views), queue=False, api_visibility="private")


def launch(demo: gr.Blocks, settings: AppSettings, **kwargs):
    """Queue on (settings.concurrency predictions at once), upload limit, no monitoring route; flagging is an
    Interface feature and Blocks has none; analytics are off in build_demo."""
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    return demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        max_file_size=settings.max_file_size,
        enable_monitoring=False,
        footer_links=["api", "gradio"],
        **kwargs,
    )


def build_app(settings: AppSettings) -> gr.Blocks:
    """The whole app for `settings`: the model loaded once (its status printed for the console), then the page."""
    predictor, status = load_predictor(settings.model, settings.threads)
    print(status, flush=True)
    return build_demo(predictor, settings.model, status, settings.examples)


def main(argv: list[str] | None = None) -> int:
    """`attrclf app [flags]`: serve the app until interrupted (argv None: the process's own flags)."""
    settings = AppSettings.parse(sys.argv[1:] if argv is None else argv)
    launch(build_app(settings), settings)
    return 0
