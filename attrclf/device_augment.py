"""Training augmentation of whole uint8 batches on the training device (--augment-on device): timm's pipeline, batched.

The loader then only reads uint8 rows (attrclf.decodecache) and collates them; this module turns a (B, 3, Hs, Ws) uint8
batch on accelerator.device (GPU when there is one, else the CPU) into the (B, 3, H, W) normalised float batch that
`transforms.train_transform` would have produced image by image, with each image's own random parameters drawn from
the same distributions:
- geometry: "whole" = the stored image (already the input size) as it is; "crop" = timm's RandomResizedCrop
  (scale (crop_scale, 1), log-uniform aspect in (3/4, 4/3), 10 attempts then the centre-crop fallback), the box drawn
  in original pixels, mapped onto the stored ones and sampled with `grid_sample` through a per-image affine grid;
- horizontal flip (p = hflip), folded into that grid for "crop";
- torchvision ColorJitter(brightness, contrast, saturation = color_jitter, no hue): each factor uniform in
  [max(0, 1 - j), 1 + j], the three applied in a random order per image (grayscale weights 0.299 / 0.587 / 0.114),
  one batched step each, clamped to [0, 255] after every step as torchvision does (`color_jitter`);
- timm RandomErasing (p = random_erasing, area 0.02..1/3, log-uniform aspect 0.3..1/0.3, 10 attempts; "pixel" noise for
  the whole geometry as `whole_image_train_transform` uses, zeros ("const", timm's default) for crop).
Written by hand rather than with torchvision.transforms.v2 (one set of parameters per call, so one call per image) or
kornia (not installed): benchmarks/README.md compares the batched ops with v2 called per image.
Parameters are drawn from torch's global CPU generator (seeded per epoch by engine.seed_epoch, so a resumed epoch draws
the same), the erasing noise from the device's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .model import AttrConfig

GRAY = (0.299, 0.587, 0.114)
# the strong view of --na-policy fixmatch: a random resized crop keeping at least this share of the image (a mark
# near the border mostly stays in view), and this colour jitter (--fixmatch-jitter's default); no erasing, which
# could remove the very mark an attribute names while its pseudo-label says it is there
STRONG_CROP_SCALE, STRONG_JITTER = 0.75, 0.6
RRC_RATIO = (3 / 4, 4 / 3)
ERASE_AREA, ERASE_ASPECT, ATTEMPTS = (0.02, 1 / 3), 0.3, 10


def _uniform(shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64) * (high - low) + low


def random_resized_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float],
                              ratio: tuple[float, float] = RRC_RATIO) -> torch.Tensor:
    """timm's RandomResizedCropAndInterpolation.get_params for each image at once.

    Args:
        sizes: (B, 2) original (width, height).

    Returns:
        (B, 4) float (left, top, width, height) in original pixels.
    """
    count = sizes.shape[0]
    width, height = sizes[:, 0].double(), sizes[:, 1].double()
    area = (width * height)[:, None]
    target_area = _uniform((count, ATTEMPTS), *scale) * area
    aspect = torch.exp(_uniform((count, ATTEMPTS), math.log(ratio[0]), math.log(ratio[1])))
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w <= width[:, None]) & (crop_h <= height[:, None])
    first = torch.argmax(fits.int(), dim=1)  # the first attempt that fits (timm stops there)
    picked = torch.arange(count)
    crop_w, crop_h, found = crop_w[picked, first], crop_h[picked, first], fits.any(dim=1)
    top = torch.floor(torch.rand(count, dtype=torch.float64) * (height - crop_h + 1))
    left = torch.floor(torch.rand(count, dtype=torch.float64) * (width - crop_w + 1))
    # fallback: the centre crop, its aspect clamped to the ratio range
    in_ratio = width / height
    fb_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    fb_left, fb_top = torch.floor((width - fb_w) / 2), torch.floor((height - fb_h) / 2)
    return torch.stack([torch.where(found, left, fb_left), torch.where(found, top, fb_top),
                        torch.where(found, crop_w, fb_w), torch.where(found, crop_h, fb_h)], dim=1)


def crop_grid(boxes: torch.Tensor, flip: torch.Tensor, *, stored: tuple[int, int], out: tuple[int, int],
              device) -> torch.Tensor:
    """The `grid_sample` grid (B, H, W, 2) that maps each output onto its box of the stored image (align_corners
    False: output pixel k samples the box at (k + 0.5) / W of its width, PIL's box resize convention), mirrored
    where `flip`.

    Args:
        boxes: (B, 4) (left, top, width, height) in stored pixels.
        stored: (Hs, Ws) of the stored images; out: (H, W) of the output.
    """
    left, top, width, height = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.double()
    theta = torch.zeros(boxes.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sign * width / stored[1]
    theta[:, 0, 2] = (2 * left + width) / stored[1] - 1
    theta[:, 1, 1] = height / stored[0]
    theta[:, 1, 2] = (2 * top + height) / stored[0] - 1
    return F.affine_grid(theta.float().to(device), [boxes.shape[0], 3, *out], align_corners=False)


def erasing_boxes(count: int, height: int, width: int, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """timm RandomErasing's boxes (one per image, count 1): (B,) bool erased, (B, 4) int (top, left, h, w)."""
    area = height * width
    target_area = _uniform((count, ATTEMPTS), *ERASE_AREA) * area
    aspect = torch.exp(_uniform((count, ATTEMPTS), math.log(ERASE_ASPECT), math.log(1 / ERASE_ASPECT)))
    box_h = torch.round(torch.sqrt(target_area * aspect))
    box_w = torch.round(torch.sqrt(target_area / aspect))
    fits = (box_w < width) & (box_h < height)
    first = torch.argmax(fits.int(), dim=1)
    picked = torch.arange(count)
    box_h, box_w = box_h[picked, first], box_w[picked, first]
    erased = (torch.rand(count, dtype=torch.float64) < probability) & fits.any(dim=1)
    top = torch.floor(torch.rand(count, dtype=torch.float64) * (height - box_h + 1))
    left = torch.floor(torch.rand(count, dtype=torch.float64) * (width - box_w + 1))
    return erased, torch.stack([top, left, box_h, box_w], dim=1).long()


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = pixels.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def color_jitter(pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter (brightness, contrast, saturation) per image, each image in its own order, clamped to
    [0, 255] after every step as torchvision does.

    Each step blends the image with a reference by its factor f: brightness with black (f x), contrast with the mean
    of the image's grey levels at that step, saturation with the image's own grey (luma). The clamp between steps
    matters on the images this tool sees most: on a white background, brightness 1.3 then contrast 0.7 leaves
    torchvision's background light grey (239 at 1.5 / 0.6); composed into one map and clamped once at the end it
    would stay white, and the colours would differ too.

    Args:
        pixels: (B, 3, H, W) floats in [0, 255].
        factors: (B, 3) brightness, contrast, saturation factors.
        order: (B, 3) a permutation of (0, 1, 2) per image: the order the three are applied in.
    """
    count = pixels.shape[0]
    rows = torch.arange(count)
    x = pixels
    for position in range(3):
        op = order[:, position]
        f = factors[rows, op].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        op = op.to(x.device).view(-1, 1, 1, 1)
        gray = grayscale(x)
        reference = torch.where(op == 2, gray, torch.where(op == 1, gray.mean(dim=(2, 3), keepdim=True), 0.0))
        x = (f * x + (1 - f) * reference).clamp_(0, 255)
    return x


class DeviceAugment:
    """uint8 batch on the device -> augmented, normalised float batch (see the module docstring).

    Args:
        config: The model's config (input size, mean, std, geometry, interpolation).
        stored: (Hs, Ws) of the uint8 rows it receives (decodecache.CacheLayout).
        crop_scale / hflip / color_jitter / random_erasing: as `transforms.train_transform`.
        channels_last: Lay the output out NHWC.
    """

    def __init__(self, config: AttrConfig, stored: tuple[int, int], *, crop_scale: float = 0.5, hflip: float = 0.5,
                 color_jitter: float = 0.3, random_erasing: float = 0.1, channels_last: bool = False):
        self.out = tuple(config.input_size[1:])
        self.stored = tuple(stored)
        self.crop = config.geometry == "crop"
        self.mode = "bicubic" if config.interpolation == "bicubic" else "bilinear"
        self.scale, self.hflip, self.jitter, self.erasing = (crop_scale, 1.0), hflip, color_jitter, random_erasing
        self.erase_noise = not self.crop  # whole geometry: timm "pixel" mode; crop: create_transform's "const"
        self.mean = torch.tensor(config.mean).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(config.std).view(1, 3, 1, 1) * 255)
        self.channels_last = channels_last

    def geometry(self, pixels: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        """Crop (or not) and flip: uint8 (B, 3, Hs, Ws) -> float (B, 3, H, W) in [0, 255]."""
        count = pixels.shape[0]
        flip = torch.rand(count) < self.hflip if self.hflip > 0 else torch.zeros(count, dtype=torch.bool)
        x = pixels.float()
        if self.crop:
            sizes = sizes.cpu() if sizes is not None else torch.tensor([self.stored[::-1]] * count)
            boxes = random_resized_crop_boxes(sizes, self.scale)
            to_stored = torch.stack([self.stored[1] / sizes[:, 0].double(), self.stored[0] / sizes[:, 1].double()], 1)
            boxes = boxes * to_stored.repeat(1, 2)
            grid = crop_grid(boxes, flip, stored=self.stored, out=self.out, device=pixels.device)
            return F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False).clamp_(0, 255)
        if flip.any():  # on the uint8 rows, only those that flip
            rows = torch.nonzero(flip).flatten().to(pixels.device)
            x[rows] = x[rows].flip(-1)
        if self.stored != self.out:
            x = F.interpolate(x, size=self.out, mode=self.mode, antialias=True, align_corners=False).clamp_(0, 255)
        return x

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """timm RandomErasing on the normalised batch, in place on the erased images only."""
        count, _, height, width = x.shape
        erased, boxes = erasing_boxes(count, height, width, self.erasing)
        rows = torch.nonzero(erased).flatten()
        if len(rows) == 0:
            return x
        top, left, box_h, box_w = (v.view(-1, 1, 1).to(x.device) for v in boxes[rows].unbind(1))
        ys = torch.arange(height, device=x.device).view(1, -1, 1)
        xs = torch.arange(width, device=x.device).view(1, 1, -1)
        inside = ((ys >= top) & (ys < top + box_h) & (xs >= left) & (xs < left + box_w)).unsqueeze(1)
        fill = torch.randn((len(rows), 3, height, width), device=x.device) if self.erase_noise else 0.0
        rows = rows.to(x.device)
        x[rows] = torch.where(inside, fill, x[rows])
        return x

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, Hs, Ws) uint8 and (B, 2) original (width, height) -> (B, 3, H, W) float, normalised."""
        x = self.geometry(pixels, sizes)
        count = x.shape[0]
        if self.jitter > 0:
            factors = _uniform((count, 3), max(0.0, 1 - self.jitter), 1 + self.jitter)
            order = torch.argsort(torch.rand(count, 3), dim=1)
            x = color_jitter(x, factors, order)
        x = (x - self.mean.to(x.device)) * self.inv_std.to(x.device)
        if self.erasing > 0:
            x = self.erase(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def strong_view(weak: DeviceAugment | None, jitter: float = STRONG_JITTER) -> DeviceAugment:
    """The stronger augmentation of --na-policy fixmatch, made from the same uint8 rows as `weak` (the usual one):
    a random resized crop of at least STRONG_CROP_SCALE of the image in either geometry, colour jitter
    max(weak's, `jitter`), the same flips, no erasing."""
    if weak is None:
        raise ValueError("the strong view needs the batched device augmentation (engine forces it for fixmatch)")
    strong = copy.copy(weak)
    strong.crop = True
    strong.scale = (max(weak.scale[0], STRONG_CROP_SCALE) if weak.crop else STRONG_CROP_SCALE, 1.0)
    strong.jitter = max(weak.jitter, jitter)
    strong.erasing = 0.0
    return strong
