"""The Gradio app: every attribute of one image or of many, thresholds that re-label without re-running the model,
a heatmap of where the model looks, and the model's validation scores.

app.py is the wiring: `AppSettings.parse()` -> `ModelLoader` (attrclf.serving) -> `build_app` -> `launch`; `attrclf
app` runs the same through `attrclf.serving.main`. What the page shows is decided by plain functions, tested without
a server: here (`chosen_thresholds`, `relabel`, `result_rows`, `present_markdown`, `example_images`), in
attrclf.ui_files (uploads, the many-files table and CSV), attrclf.ui_model (the model panel) and attrclf.heatmap.

torch is not imported by this module: the model loader's thread imports it while gradio imports here.
"""

import contextlib
import html
import os
import threading
from pathlib import Path

import gradio as gr
import numpy as np

from . import demo as demo_data
from .errors import AttrclfError
from .images import IMAGE_SUFFIXES
from .serving import AppSettings, MicroBatcher, ModelLoader
from .ui_files import (
    ABSENT,
    PRESENT,
    CsvFolder,
    file_csv,
    file_table,
    from_state,
    present_counts,
    read_upload,
    score_files,
    table_headers,
    to_state,
    upload_records,
)
from .ui_model import VALIDATION_HEADERS, model_markdown, read_metrics, read_pr_curves, validation_rows

__all__ = ["ABSENT", "PRESENT", "AppSettings", "build_app", "build_demo", "launch", "read_upload"]

TABLE_HEADERS = ["Attribute", "Probability", "Threshold", "Status"]
# The demo's attributes for each generated example, and the caption shown under it.
DEMO_EXAMPLES = [
    {"outlined": 1, "red": 1, "striped": 0, "large": 1, "dark_background": 1, "dot": 0},
    {"outlined": 0, "red": 0, "striped": 1, "large": 0, "dark_background": 0, "dot": 1},
    {"outlined": 1, "red": 0, "striped": 0, "large": 0, "dark_background": 0, "dot": 0},
    {"outlined": 0, "red": 1, "striped": 1, "large": 1, "dark_background": 1, "dot": 1},
]
EXAMPLE_SIZE = 64  # the demo images' own size: the demo model has seen nothing else


# ---------------------------------------------------------------- pure parts of the page


def chosen_thresholds(predictor, use_global: bool, global_threshold: float) -> list[float]:
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
    from .predict import apply_thresholds  # loaded with the model by then: this module does not import torch itself

    return apply_thresholds(np.asarray(probs), label_names, thresholds)


def held_probs(result: dict | None, label_names: list[str]) -> list[float] | None:
    """The probabilities a shown result holds, in the model's attribute order (None before any image)."""
    if not result or "probabilities" not in result:
        return None
    return [result["probabilities"][name] for name in label_names]


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


# ---------------------------------------------------------------- the model as the page uses it


class Scorer:
    """The predictor behind the page: single images through a MicroBatcher (one forward pass for the requests that
    arrive together), many files in batches, and heatmaps with the torch model.

    Args:
        predictor: The loaded Predictor.
        model_id: Its folder or Hub id (a heatmap on a predictor without a torch model loads it from there).
        max_batch_size: Most single-image requests per forward pass.
        batch_wait_ms: How long the first request of a batch waits for others.
    """

    def __init__(self, predictor, model_id: str, max_batch_size: int = 8, batch_wait_ms: float = 2.0):
        self.predictor = predictor
        self.model_id = model_id
        self.label_names = list(predictor.label_names)
        self.batcher = MicroBatcher(self._batch_probs, max_batch_size, batch_wait_ms / 1000)
        self._torch_model = None
        self._lock = threading.Lock()

    def _batch_probs(self, pixel_values: list) -> np.ndarray:
        return self.predictor.probs_from_pixels(pixel_values, batch_size=len(pixel_values))

    def probs(self, path: str, name: str | None) -> list[float]:
        """One image's probabilities; its model call shares a forward pass with the requests waiting beside it."""
        pixel_values = read_upload(path, name, decode=self.predictor.preprocess)
        return [float(p) for p in self.batcher(pixel_values)]

    def torch_model(self):
        """The predictor's torch model; for a predictor without one (another backend), loaded once from model_id."""
        from torch import nn

        model = getattr(self.predictor, "model", None)
        if isinstance(model, nn.Module):
            return model
        with self._lock:
            if self._torch_model is None:
                from .model import AttrClassifier

                self._torch_model = AttrClassifier.from_pretrained(self.model_id).eval()
            return self._torch_model

    def heatmap(self, path: str, name: str | None, attribute: str):
        """The image with the Grad-CAM heatmap of `attribute` overlaid (the image's size)."""
        from .heatmap import heatmap, overlay

        if attribute not in self.label_names:
            raise AttrclfError(f"attribute must be one of {', '.join(self.label_names)} (got {attribute!r})")
        image = read_upload(path, name)
        pixel_values = self.predictor.preprocess(image)
        heat = heatmap(self.torch_model(), pixel_values, image, self.label_names.index(attribute))
        return overlay(image, heat)


def upload_path(upload: dict | None) -> tuple[str, str | None] | None:
    """(path, the name the user gave) of a gr.Image / gr.File upload record; None when there is none. gradio has
    already checked that the path lies in its upload folder."""
    if not upload:
        return None
    if not upload.get("path"):
        raise gr.Error("Send the image as an uploaded file.", print_exception=False)
    return upload["path"], upload.get("orig_name")


def user_error(error: AttrclfError, title: str = "Error") -> gr.Error:
    """A message the user sees (the server goes on serving); gradio shows it as HTML, so the user's file names in it
    are escaped."""
    return gr.Error(html.escape(str(error), quote=False), title=title, print_exception=False)


def uploaded_image(upload: dict | None):
    """The decoded RGB image of an upload record (attrclf.ui_files.read_upload); a file it cannot use is a gr.Error."""
    where = upload_path(upload)
    if where is None:
        return None
    try:
        return read_upload(*where)
    except AttrclfError as e:
        raise user_error(e, "Cannot use this file") from None


# ---------------------------------------------------------------- gradio


def build_demo(predictor, model: str | None, status: str, examples_folder: str | None = None, *,
               max_batch_size: int = 8, batch_wait_ms: float = 2.0, concurrency: int = 8):
    """The page. Without a predictor, a page that says why and how to get a model."""
    with gr.Blocks(title="attrclf", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# attrclf: image attributes\nEvery attribute is scored on its own: an image can have any number.")
        if predictor is None:
            gr.Markdown(f"### No model loaded\n\n{status}", elem_id="no-model")
            return demo
        scorer = Scorer(predictor, model, max_batch_size, batch_wait_ms)
        demo.scorer = scorer  # tests read its batcher's batch sizes
        controls = _single_image(scorer, examples_folder, concurrency)
        _heatmap_section(scorer, controls["image"])
        _many_files(scorer, controls)
        _model_panel(predictor.config, model)
    return demo


def _single_image(scorer: Scorer, examples_folder: str | None, concurrency: int) -> dict:
    """One image: upload, thresholds, the table. Returns the controls the other sections share."""
    names = scorer.label_names
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
    _wire_single(scorer, image, use_global, threshold, result, (present, table, label), concurrency)
    return {"image": image, "use_global": use_global, "threshold": threshold}


def _wire_single(scorer: Scorer, image, use_global, threshold, result, views, concurrency: int) -> None:
    """The model runs only when the image changes (queued, batched with other users' images); threshold moves
    re-label the probabilities the shown result holds."""
    predictor, names = scorer.predictor, scorer.label_names

    def predict(image: dict | None, use_global_threshold: bool = False, global_threshold: float = 0.5):
        """Every attribute's probability, the thresholds used and the attributes present."""
        try:
            thresholds = chosen_thresholds(predictor, use_global_threshold, global_threshold)
            where = upload_path(image)
            return {} if where is None else relabel(scorer.probs(*where), names, thresholds)
        except AttrclfError as e:
            raise user_error(e, "Cannot use this file") from None

    def rethreshold(shown: dict, use_global_threshold: bool, global_threshold: float):
        thresholds = chosen_thresholds(predictor, use_global_threshold, global_threshold)
        return relabel(held_probs(shown, names), names, thresholds)

    def slide(shown: dict, global_threshold: float):
        return True, rethreshold(shown, True, global_threshold)

    def show(shown: dict):
        return present_markdown(shown), result_rows(shown), shown.get("probabilities", {}) if shown else {}

    # preprocess=False: `predict` gets gradio's checked upload record and decodes it itself (ui_files.read_upload),
    # so an unreadable file is a clear message rather than gr.Image's generic decoding error.
    image.change(predict, [image, use_global, threshold], result, api_name="predict", preprocess=False,
                 concurrency_limit=concurrency, concurrency_id="predict")
    use_global.input(rethreshold, [result, use_global, threshold], result, queue=False, api_visibility="private")
    threshold.input(slide, [result, threshold], [use_global, result], queue=False, trigger_mode="always_last",
                    api_visibility="private")
    result.change(show, result, list(views), queue=False, api_visibility="private")


def _heatmap_section(scorer: Scorer, image) -> None:
    """Where the model looks, for the image above and one attribute: computed only when asked (one at a time)."""
    with gr.Accordion("Where does the model look? (Grad-CAM heatmap)", open=True):
        with gr.Row():
            attribute = gr.Dropdown(scorer.label_names, value=scorer.label_names[0], label="Attribute",
                                    elem_id="heatmap-attribute")
            button = gr.Button("Show the heatmap", elem_id="heatmap-button")
        shown = gr.Image(type="pil", format="png", interactive=False, height=320, label="Heatmap (red: raises the "
                         "attribute's score most; blue: not at all)", elem_id="heatmap")

    def heatmap(image: dict | None, attribute_name: str):
        """The image with the heatmap of `attribute_name` overlaid, at the image's size."""
        where = upload_path(image)
        if where is None:
            raise gr.Error("Upload an image first.", print_exception=False)
        try:
            return scorer.heatmap(*where, attribute_name)
        except AttrclfError as e:
            raise user_error(e, "No heatmap") from None

    button.click(heatmap, [image, attribute], shown, api_name="heatmap", preprocess=False, concurrency_limit=1,
                 concurrency_id="heatmap")
    image.change(lambda: None, None, shown, queue=False, api_visibility="private")  # a new image: the old map goes


def _many_files(scorer: Scorer, controls: dict) -> None:
    """Several images or a folder: one row per file, PRESENT / absent per attribute under the page's thresholds, and
    the same as a CSV download. A threshold change re-labels the held probabilities (gr.State) without the model."""
    predictor, names = scorer.predictor, scorer.label_names
    csv_folder = CsvFolder()
    with gr.Accordion("Several images or a folder", open=True):
        with gr.Row():
            files = gr.File(file_count="multiple", file_types=["image"], label="Images (several files)",
                            elem_id="files")
            folder = gr.File(file_count="directory", label="A folder of images", elem_id="folder")
        summary = gr.Markdown(present_counts([], names, []), elem_id="files-summary")
        table = gr.Dataframe(headers=table_headers(names), interactive=False, label="Every image x attribute",
                             elem_id="files-table", wrap=True)
        download = gr.DownloadButton("Download the table (CSV)", value=None, elem_id="files-csv")
    held = gr.State([])
    views = [table, summary, download]

    def render(scores, thresholds):
        rows = file_table(scores, names, thresholds)
        csv_path = csv_folder.write(file_csv(scores, names, thresholds)) if scores else None
        return rows, present_counts(scores, names, thresholds), csv_path

    def score(uploads: list | None, use_global_threshold: bool = False, global_threshold: float = 0.5):
        """Every file's attributes: a table (image x attribute), a summary line and the CSV file of the table."""
        try:
            thresholds = chosen_thresholds(predictor, use_global_threshold, global_threshold)
            scores = score_files(predictor, upload_records(uploads))
        except AttrclfError as e:
            raise user_error(e) from None
        return to_state(scores), *render(scores, thresholds)

    def rethreshold(state, use_global_threshold: bool, global_threshold: float):
        return render(from_state(state), chosen_thresholds(predictor, use_global_threshold, global_threshold))

    def slide(state, global_threshold: float):
        return rethreshold(state, True, global_threshold)

    inputs = [controls["use_global"], controls["threshold"]]
    files.change(score, [files, *inputs], [held, *views], api_name="predict_files", preprocess=False,
                 concurrency_limit=1, concurrency_id="files")
    folder.change(score, [folder, *inputs], [held, *views], preprocess=False, concurrency_limit=1,
                  concurrency_id="files", api_visibility="private")
    controls["use_global"].input(rethreshold, [held, *inputs], views, queue=False, api_visibility="private")
    controls["threshold"].input(slide, [held, controls["threshold"]], views, queue=False,
                                trigger_mode="always_last", api_visibility="private")


def _model_panel(config, model: str) -> None:
    """What the model is and its validation figures (per attribute, and the PR curves) when training left them."""
    metrics = read_metrics(model)
    with gr.Accordion("The model", open=True, elem_id="model-panel"):
        gr.Markdown(model_markdown(config, model, metrics), elem_id="model")
        rows = validation_rows(metrics, config.label_names)
        if rows:
            gr.Dataframe(rows, headers=VALIDATION_HEADERS, interactive=False, label="Validation, per attribute",
                         elem_id="validation-table")
        curves = read_pr_curves(model)
        if curves is not None:
            gr.Image(curves, interactive=False, label="Precision-recall on validation (the dot: tuned threshold)",
                     elem_id="pr-curves", format="png")


def skip_matplotlib() -> None:
    """Keep matplotlib off the serving path. gradio 6 wraps every queued call in `utils.MatplotlibBackendMananger`,
    which imports matplotlib (0.5-1 s, tens of MB) to switch gr.Plot figures to the headless backend; this page has no
    gr.Plot, so the wrapper becomes a no-op context (looked up at call time by gradio.route_utils)."""
    import gradio.utils

    gradio.utils.MatplotlibBackendMananger = contextlib.nullcontext


def launch(demo: gr.Blocks, settings: AppSettings, **kwargs):
    """Queue on (settings.queue_size may wait), upload limit, no monitoring route; flagging is an Interface feature
    and Blocks has none; analytics are off in build_demo. Each event sets its own concurrency (build_demo)."""
    skip_matplotlib()
    demo.queue(max_size=settings.queue_size)
    return demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        max_file_size=settings.max_file_size,
        enable_monitoring=False,
        footer_links=["api", "gradio"],
        **kwargs,
    )


def build_app(settings: AppSettings, loader: ModelLoader | None = None) -> gr.Blocks:
    """The whole app for `settings`: the model loaded once (by `loader`, started earlier so that torch imports while
    gradio does; its status printed for the console), then the page."""
    loader = loader or ModelLoader(settings.model, settings.threads, settings.backend)
    predictor, status = loader.result()
    print(status, flush=True)
    return build_demo(predictor, settings.model, status, settings.examples, max_batch_size=settings.max_batch_size,
                      batch_wait_ms=settings.batch_wait_ms, concurrency=settings.concurrency)
