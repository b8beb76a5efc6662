"""Image -> tensor preprocessing from the model's config: timm's train and eval transforms, and a fast eval path.

`eval_transform` and `train_transform` are timm's `create_transform` with the config's input size, interpolation,
mean, std and crop. `FastEvalTransform` computes the same eval geometry in fewer steps for serving (Predictor).
"""

import math

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from .images import load_image
from .model import AttrConfig

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def eval_transform(config: AttrConfig):
    """The deterministic preprocessing of the model's config (resize, centre crop, normalise)."""
    return create_transform(
        input_size=tuple(config.input_size),
        is_training=False,
        interpolation=config.interpolation,
        mean=tuple(config.mean),
        std=tuple(config.std),
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
    )


def train_transform(
    config: AttrConfig,
    *,
    crop_scale: float = 0.5,
    hflip: float = 0.5,
    color_jitter: float = 0.3,
    random_erasing: float = 0.1,
):
    """timm's training transform: random resized crop (scale crop_scale..1), flip, colour jitter, random erasing.

    The crop scale floor is milder than ImageNet's 0.08 on purpose: attributes such as size or position must survive.
    Colour jitter changes brightness, contrast and saturation, never hue.
    """
    return create_transform(
        input_size=tuple(config.input_size),
        is_training=True,
        scale=(crop_scale, 1.0),
        hflip=hflip,
        vflip=0.0,
        color_jitter=color_jitter,
        re_prob=random_erasing,
        interpolation=config.interpolation,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )


class FastEvalTransform:
    """The model's eval transform (shorter side to size / crop_pct, centre crop, normalise) done in fewer steps.

    timm's transform resizes the whole image and then crops it. Here a JPEG decodes at the smallest DCT scale that is
    still at least the resized size (PIL `draft`), one PIL resize maps the crop box straight to the input size (with
    `reducing_gap`, a cheap box reduction first when shrinking a lot), and a uint8 array becomes a normalised tensor in
    one fused step. Same geometry as timm's; pixel values differ from it only by resampling rounding (and, for large
    JPEGs, by the reduced-scale decode). Used for config crop_mode "center"; other modes keep timm's transform.
    """

    def __init__(self, config: AttrConfig):
        self.height, self.width = config.input_size[1:]
        self.scale_size = math.floor(min(self.height, self.width) / config.crop_pct)
        self.resample = PIL_FILTERS[config.interpolation]
        self.offset = torch.tensor(config.mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(config.std).view(3, 1, 1) * 255)

    @staticmethod
    def supports(config: AttrConfig) -> bool:
        return config.crop_mode == "center" and config.interpolation in PIL_FILTERS and config.input_size[0] == 3

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """torchvision's Resize(int): the shorter side becomes scale_size, the longer keeps the aspect (floored)."""
        if width <= height:
            return self.scale_size, int(self.scale_size * height / width)
        return int(self.scale_size * width / height), self.scale_size

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centre crop of the resized image, in source pixel coordinates (torchvision's rounding)."""
        new_w, new_h = self.resized_size(width, height)
        left, top = round((new_w - self.width) / 2.0), round((new_h - self.height) / 2.0)
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + self.width) * sx, (top + self.height) * sy

    def load(self, source) -> Image.Image:
        """Decode (JPEGs at a reduced scale that still covers the resized size) and convert to RGB."""
        return load_image(source, draft=self.resized_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) normalised float tensor."""
        crop = image.resize((self.width, self.height), self.resample, box=self.crop_box(*image.size),
                            reducing_gap=3.0)
        pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()
        return (pixels - self.offset) * self.scale
