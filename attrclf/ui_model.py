"""The app's model panel: what the model is and how it scored on validation, from the files training wrote beside it.

A model folder or Hub repo made by training holds metrics.json (format: attrclf.reporting) and pr_curves.png
(attrclf.plots); the panel shows the validation mAP and macro-F1, a per-attribute table (AP, tuned threshold, F1,
precision, recall, label counts) and the precision-recall plot when they are there, and says so when they are not.
No gradio here: attrclf.ui shows what these return.
"""

from __future__ import annotations

import json
import os

from PIL import Image

METRICS_FILE = "metrics.json"
PR_CURVES_FILE = "pr_curves.png"
VALIDATION_HEADERS = ["Attribute", "AP", "Threshold", "F1", "Precision", "Recall", "Positives", "Negatives", "NA"]


def model_file(model: str, name: str) -> str | None:
    """The path of `name` in a model folder, or in its Hub repo (downloaded to the cache); None when it has none."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model, name)
    except Exception:  # noqa: BLE001 (no such file, no network, no such repo: the panel says it is not there)
        return None


def read_metrics(model: str) -> dict:
    """metrics.json beside a model folder or in its Hub repo; {} when there is none or it cannot be read."""
    path = model_file(model, METRICS_FILE)
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # unreadable or bad JSON: the panel says n/a
        return {}


def read_pr_curves(model: str) -> Image.Image | None:
    """pr_curves.png of the model as an image (handed to the page as pixels, so it may live in any cache)."""
    path = model_file(model, PR_CURVES_FILE)
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError):
        return None


def model_markdown(config, model: str, metrics: dict) -> str:
    """The panel's text: where the model comes from, backbone, input size, attributes, validation scores."""
    validation = metrics.get("validation", {})
    score = {key: "n/a" if validation.get(key) is None else f"{validation[key]:.3f}"
             for key in ("mAP", "f1_macro_tuned")}
    lines = [
        (f"**Model** `{model}`: {config.backbone}, input {config.input_size[1]}x{config.input_size[2]} px, "
         f"{len(config.label_names)} attributes."),
        (f"**Validation** mAP {score['mAP']}, macro-F1 at the tuned thresholds {score['f1_macro_tuned']}"
         + ("" if metrics else f" (no {METRICS_FILE} beside the model)") + "."),
        "**Tuned thresholds:** "
        + ", ".join(f"{n} {t:.2f}" for n, t in zip(config.label_names, config.thresholds, strict=True)),
    ]
    if validation.get("num_images"):
        lines.append(f"Validation figures over {validation['num_images']} images (known labels only).")
    return "\n\n".join(lines)


def validation_rows(metrics: dict, label_names: list[str]) -> list[list]:
    """One row per attribute from metrics.json's validation.per_attribute ([] without it); undefined figures "n/a"."""
    per_attribute = metrics.get("validation", {}).get("per_attribute") or {}
    rows = []
    for name in label_names:
        row = per_attribute.get(name)
        if row is None:
            continue
        rows.append([name, *[_figure(row.get(key)) for key in ("ap", "threshold", "f1", "precision", "recall")],
                     *[row.get(key, "") for key in ("positives", "negatives", "na")]])
    return rows


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
