"""Where the model looks: a Grad-CAM heatmap of one attribute on one image, overlaid on the image.

Grad-CAM (Selvaraju et al., 2017) on the backbone's last feature map A (F channels, h x w): the weight of channel c
is the mean over positions of d logit / d A_c, and the map is ReLU(sum_c weight_c A_c), scaled to [0, 1]. Written
with torch autograd here rather than the `grad-cam` package: that package brings opencv-python and matplotlib (which
the serving path must not import) and wants a target layer per architecture, while AttrClassifier already exposes
the feature map its head reads (timm `forward_features`; the pooled path goes through `forward_head`). Only the head
part needs gradients: the backbone runs once without them.

The map is placed where the model saw the image: the whole image for the "whole" geometry, the centre crop's box for
"crop" (FastEvalTransform.crop_box), and nothing outside it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import AttrclfError
from .model import AttrClassifier
from .transforms import FastEvalTransform

# Colours of the heatmap from 0 to 1 (dark blue, blue, cyan, yellow, red): a jet-like ramp without matplotlib.
RAMP = np.array([[0, 0, 128], [0, 64, 255], [0, 224, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
OVERLAY_ALPHA = 0.5


def feature_map_logits(model: AttrClassifier, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, F, h, w) feature map that requires grad, (B, A) logits computed from it) for normalised pixels.

    Raises:
        AttrclfError: the backbone gives tokens (ViT), not a spatial feature map.
    """
    with torch.no_grad():
        raw = model.backbone.forward_features(pixel_values)
    if raw.ndim != 4:
        raise AttrclfError(f"heatmaps need a convolutional feature map; backbone '{model.config.backbone}' gives "
                           f"tokens of shape {tuple(raw.shape)}")
    raw = raw.detach().requires_grad_(True)
    nhwc = getattr(model.backbone, "output_fmt", "NCHW") == "NHWC"
    fmap = raw.permute(0, 3, 1, 2) if nhwc else raw
    # the head reads what AttrClassifier.features gives it: the feature map (spatial heads) or its pooled features
    features = fmap if model.head.spatial else model.backbone.forward_head(raw)
    return fmap, model.head(features)


def grad_cam(model: AttrClassifier, pixel_values: torch.Tensor, attribute: int) -> np.ndarray:
    """(h, w) Grad-CAM of `attribute` for one (1, C, H, W) image, in [0, 1] (all 0 where no position raises it)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            fmap, logits = feature_map_logits(model, pixel_values)
            (grads,) = torch.autograd.grad(logits[0, attribute], fmap)
    finally:
        model.train(was_training)
    weights = grads[0].mean(dim=(1, 2))  # (F,)
    cam = torch.relu(torch.einsum("f,fhw->hw", weights, fmap[0].detach()))
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)


def seen_box(config, width: int, height: int) -> tuple[int, int, int, int]:
    """The part of a width x height image the model sees, in its pixels: (left, top, right, bottom)."""
    if (config.crop_mode == "squash" and config.crop_pct >= 1.0) or not FastEvalTransform.supports(config):
        return 0, 0, width, height
    left, top, right, bottom = FastEvalTransform(config).crop_box(width, height)
    return (max(0, round(left)), max(0, round(top)), min(width, round(right)), min(height, round(bottom)))


def map_to_image(cam: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """The (h, w) map resized into `box` of an image of `size` (W, H): a (H, W) float array, 0 outside the box."""
    left, top, right, bottom = box
    full = np.zeros((size[1], size[0]), dtype=np.float32)
    resized = Image.fromarray(cam, mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    full[top:bottom, left:right] = np.asarray(resized)
    return np.clip(full, 0.0, 1.0)


def colourise(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB along RAMP."""
    stops = np.linspace(0.0, 1.0, len(RAMP))
    return np.stack([np.interp(heat, stops, RAMP[:, channel]) for channel in range(3)], axis=-1)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The RGB image with the coloured (H, W) heat blended on top; the same size as the image."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * base + alpha * colourise(heat)
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def heatmap(model: AttrClassifier, pixel_values: torch.Tensor, image: Image.Image, attribute: int) -> np.ndarray:
    """(H, W) Grad-CAM of `attribute` in [0, 1] at the size of `image` (decoded RGB), where the model saw it.

    Args:
        model: The torch model.
        pixel_values: (C, H', W') the image preprocessed for the model.
        image: The decoded image (its size is the heatmap's).
        attribute: Index of the attribute.
    """
    device = next(model.parameters()).device
    cam = grad_cam(model, pixel_values.unsqueeze(0).to(device), attribute)
    return map_to_image(cam, image.size, seen_box(model.config, *image.size))
