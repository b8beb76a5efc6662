"""attrclf.device_augment: the batched parameters follow timm's distributions over many draws, the ops do what the
per-image transforms do, and with augmentation off the device path equals the eval transform."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as TF

from attrclf.decodecache import CacheLayout
from attrclf.device_augment import DeviceAugment, color_jitter, crop_grid, erasing_boxes, random_resized_crop_boxes
from attrclf.model import AttrConfig
from attrclf.transforms import eval_transform

DRAWS = 20000


def timm_crops(width, height, scale, draws):
    """(area fraction, log aspect) of timm's own random resized crop parameters."""
    random.seed(0)
    out = []
    for _ in range(draws):
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (width, height)), scale,
                                                                       (3 / 4, 4 / 3))
        out.append((h * w / (width * height), math.log(w / h), left / max(width - w, 1)))
    return np.array(out)


@pytest.mark.parametrize("size", [(64, 64), (120, 40)])  # square, and elongated (many attempts fail, fallbacks)
def test_random_resized_crop_parameters_match_timms(size):
    torch.manual_seed(0)
    boxes = random_resized_crop_boxes(torch.tensor([size] * DRAWS), (0.5, 1.0)).numpy()
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= size[0]).all() and (top + h <= size[1]).all()
    ours = np.stack([w * h / (size[0] * size[1]), np.log(w / h), left / np.maximum(size[0] - w, 1)], 1)
    reference = timm_crops(*size, (0.5, 1.0), DRAWS)
    for column in range(3):  # area fraction, log aspect, horizontal position: mean and quartiles within noise
        for q in (25, 50, 75):
            assert abs(np.percentile(ours[:, column], q) - np.percentile(reference[:, column], q)) < 0.02
        assert abs(ours[:, column].mean() - reference[:, column].mean()) < 0.01
    if size == (64, 64):  # the configured range: area uniform over the scale where the aspect fits
        assert 0.49 < ours[:, 0].min() and ours[:, 0].max() <= 1.0
        assert abs(ours[:, 1]).max() <= math.log(4 / 3) + 0.05


def test_erasing_parameters_match_timms():
    torch.manual_seed(0)
    erased, boxes = erasing_boxes(DRAWS, 32, 48, 0.25)
    assert abs(erased.float().mean().item() - 0.25) < 0.01
    top, left, h, w = boxes[erased].numpy().T
    assert (top + h <= 32).all() and (left + w <= 48).all()
    ours = np.stack([h * w / (32 * 48), np.log(h / w)], 1)
    random.seed(0)
    eraser = RandomErasing(probability=1.0, mode="const", device="cpu")
    reference = []
    for _ in range(4000):
        image = torch.ones(3, 32, 48)
        eraser(image)
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        if len(rows):
            h_, w_ = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            reference.append((float(h_ * w_) / (32 * 48), math.log(float(h_) / float(w_))))
    reference = np.array(reference)
    for column in range(2):
        for q in (25, 50, 75):
            assert abs(np.percentile(ours[:, column], q) - np.percentile(reference[:, column], q)) < 0.03


def whole_config(size=16):
    return AttrConfig.for_backbone("test_resnet", ["a"], image_size=size)


def test_flip_rate_and_flipped_pixels():
    config = whole_config()
    pixels = torch.randint(0, 256, (DRAWS // 10, 3, 16, 16), dtype=torch.uint8)
    augment = DeviceAugment(config, (16, 16), hflip=0.3, color_jitter=0.0, random_erasing=0.0)
    torch.manual_seed(1)
    out = augment(pixels)
    plain = DeviceAugment(config, (16, 16), hflip=0.0, color_jitter=0.0, random_erasing=0.0)(pixels)
    flipped = torch.isclose(out, plain.flip(-1)).flatten(1).all(1)
    assert torch.isclose(out, plain).flatten(1).all(1).logical_xor(flipped).all()  # each image: one or the other
    assert abs(flipped.float().mean().item() - 0.3) < 0.03


def test_erasing_rate_and_fill_on_the_batch():
    config = whole_config()
    pixels = torch.full((4000, 3, 16, 16), 128, dtype=torch.uint8)
    torch.manual_seed(2)
    out = DeviceAugment(config, (16, 16), hflip=0.0, color_jitter=0.0, random_erasing=0.2)(pixels)
    plain = DeviceAugment(config, (16, 16), hflip=0.0, color_jitter=0.0, random_erasing=0.0)(pixels)
    changed = (out != plain).flatten(1).any(1)
    assert abs(changed.float().mean().item() - 0.2) < 0.02
    noise = out[changed][out[changed] != plain[changed]]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05  # "pixel" mode: N(0, 1)


@pytest.mark.parametrize("size", [16, 33])
def test_all_augmentation_off_equals_the_eval_transform(size):
    """Whole geometry: the stored rows (cache layout) through the device path = timm's eval transform of the image."""
    config = whole_config(size)
    layout = CacheLayout.for_model(config)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 30), (50, 17))]
    rows = torch.stack([torch.from_numpy(layout.resize(image)).permute(2, 0, 1) for image in images])
    out = DeviceAugment(config, (layout.height, layout.width), hflip=0.0, color_jitter=0.0, random_erasing=0.0)(rows)
    expected = torch.stack([eval_transform(config)(image) for image in images])
    levels = (out - expected) * torch.tensor(config.std).view(1, 3, 1, 1) * 255
    assert levels.abs().max() <= 1.0


def test_color_jitter_matches_torchvision_per_image():
    """Each image's factors applied in its own order equal torchvision's adjust_* in that order (floats; pixels and
    factors where no step leaves [0, 255], so torchvision's clamps in between change nothing)."""
    torch.manual_seed(3)
    pixels = torch.rand(6, 3, 8, 8) * 90 + 80
    factors = torch.rand(6, 3).double() * 0.4 + 0.8
    order = torch.argsort(torch.rand(6, 3), dim=1)
    out = color_jitter(pixels, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(6):
        image = pixels[i] / 255
        for op in order[i].tolist():
            image = ops[op](image, float(factors[i, op]))
        assert torch.allclose(out[i] / 255, image, atol=2e-3)


def test_color_jitter_clamps_after_every_step_as_torchvision_does():
    """White background, red square: brightness 1.5 then contrast 0.6 (torchvision on uint8: background 239, square
    (239, 113, 113)); one composed map clamped once at the end gave a white background and (255, 155, 155)."""
    pixels = torch.full((1, 3, 8, 8), 255.0)
    pixels[0, 0, 2:6, 2:6], pixels[0, 1:, 2:6, 2:6] = 220, 30
    out = color_jitter(pixels, torch.tensor([[1.5, 0.6, 1.0]], dtype=torch.float64), torch.tensor([[0, 1, 2]]))
    reference = TF.adjust_contrast(TF.adjust_brightness(pixels[0].to(torch.uint8), 1.5), 0.6)
    assert reference[:, 0, 0].tolist() == [239, 239, 239] and reference[:, 3, 3].tolist() == [239, 113, 113]
    assert (out[0] - reference.float()).abs().max() <= 2.0  # uint8 torchvision truncates its grey levels
    floats = TF.adjust_contrast(TF.adjust_brightness(pixels[0] / 255, 1.5), 0.6) * 255  # clamps at 1 in between
    assert torch.allclose(out[0], floats, atol=0.05)  # its grey weighs red 0.2989, this 0.299
    # saturation 0 then brightness 2: grey first, then clipped at white
    grey_then_bright = color_jitter(pixels, torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64),
                                    torch.tensor([[2, 0, 1]]))
    expected = TF.adjust_brightness(TF.adjust_saturation(pixels[0] / 255, 0.0), 2.0) * 255
    assert torch.allclose(grey_then_bright[0], expected, atol=0.05)


def test_crop_grid_samples_the_box():
    """An exact box (the whole left half, 2x up) samples the same pixels as cropping then resizing by hand."""
    image = torch.arange(8 * 8, dtype=torch.float32).view(1, 1, 8, 8).repeat(1, 3, 1, 1)
    box = torch.tensor([[0.0, 0.0, 4.0, 8.0]])  # left half, full height
    grid = crop_grid(box, torch.tensor([False]), stored=(8, 8), out=(8, 4), device="cpu")
    out = torch.nn.functional.grid_sample(image, grid, mode="bilinear", align_corners=False)
    assert torch.allclose(out, image[..., :4])
    flipped = torch.nn.functional.grid_sample(
        image, crop_grid(box, torch.tensor([True]), stored=(8, 8), out=(8, 4), device="cpu"), align_corners=False)
    assert torch.allclose(flipped, image[..., :4].flip(-1))


def test_crop_geometry_batch_shapes_and_range():
    config = AttrConfig.for_backbone("test_resnet", ["a"], image_size=16, geometry="crop")
    layout = CacheLayout.for_model(config)
    pixels = torch.randint(0, 256, (8, 3, layout.height, layout.width), dtype=torch.uint8)
    sizes = torch.tensor([[100, 50]] * 4 + [[30, 60]] * 4)
    out = DeviceAugment(config, (layout.height, layout.width), channels_last=True)(pixels, sizes)
    assert out.shape == (8, 3, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    low = (0 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert (out.amin(dim=(0, 2, 3)) >= low - 1e-4).all()  # const erasing = 0, the rest within [0, 255] normalised
