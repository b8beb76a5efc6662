"""Image -> tensor preprocessing from the model's config: train and eval transforms, and a fast eval path.

Two geometries (AttrConfig.geometry, stored in config.json as timm's crop_mode / crop_pct):
- "whole" (the default for new models): the whole image is resized to the input size, for training and evaluation
  alike, so an attribute that is a small mark near the border is never cropped away: not at test time, and not from a
  training image whose label says it is there. This is how multilabel recipes (ASL, ML-Decoder) preprocess.
- "crop": timm's ImageNet geometry: random resized crops for training, a centre crop of crop_pct for evaluation.
`eval_transform` is timm's `create_transform` with the config's size, interpolation, mean, std and crop (squash mode
at crop_pct 1 for "whole"). `FastEvalTransform` computes the same eval geometry in fewer steps for serving (Predictor).
"""

import math

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

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
    """Training augmentation in the config's geometry: flip, colour jitter (brightness, contrast, saturation; never
    hue), random erasing, and for the "crop" geometry timm's random resized crop (scale crop_scale..1; the floor is
    milder than ImageNet's 0.08 on purpose: attributes such as size or position must survive).

    "whole" resizes the whole image to the input size instead of cropping (crop_scale is not used).
    """
    if config.geometry == "whole":
        return whole_image_train_transform(config, hflip=hflip, color_jitter=color_jitter,
                                           random_erasing=random_erasing)
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


def whole_image_train_transform(config: AttrConfig, *, hflip: float, color_jitter: float, random_erasing: float):
    """The whole image resized to the input size, then timm's flip / jitter / normalise / per-pixel random erasing."""
    steps = [transforms.Resize(tuple(config.input_size[1:]), interpolation=str_to_interp_mode(config.interpolation))]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(p=hflip))
    if color_jitter > 0:
        steps.append(transforms.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=config.mean, std=config.std)]
    if random_erasing > 0:
        steps.append(RandomErasing(probability=random_erasing, mode="pixel", device="cpu"))
    return transforms.Compose(steps)


class FastEvalTransform:
    """The model's eval transform (resize to size / crop_pct, centre crop, normalise) done in fewer steps.

    timm's transform resizes the whole image and then crops it. Here a JPEG decodes at the smallest DCT scale that is
    still at least the resized size (PIL `draft`), one PIL resize maps the crop box straight to the input size (with
    `reducing_gap`, a cheap box reduction first when shrinking a lot), and a uint8 array becomes a normalised tensor in
    one fused step. Same geometry as timm's; pixel values differ from it only by resampling rounding (and, for large
    JPEGs, by the reduced-scale decode). Used for config crop_mode "center" (the shorter side is resized, the aspect
    kept) and "squash" (each side resized on its own: at crop_pct 1 the whole image, the "whole" geometry); "border"
    keeps timm's transform.
    """

    def __init__(self, config: AttrConfig):
        self.height, self.width = config.input_size[1:]
        self.squash = config.crop_mode == "squash"
        self.scale_size = math.floor(min(self.height, self.width) / config.crop_pct)
        self.squash_size = (math.floor(self.width / config.crop_pct), math.floor(self.height / config.crop_pct))
        self.resample = PIL_FILTERS[config.interpolation]
        self.offset = torch.tensor(config.mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(config.std).view(3, 1, 1) * 255)

    @staticmethod
    def supports(config: AttrConfig) -> bool:
        return (config.crop_mode in ("center", "squash") and config.interpolation in PIL_FILTERS
                and config.input_size[0] == 3)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """timm's resize before the crop: squash to (W, H) / crop_pct; else torchvision's Resize(int), the shorter side
        to scale_size and the longer keeping the aspect (floored)."""
        if self.squash:
            return self.squash_size
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
