"""The speed work keeps the answers: channels_last batches, the fast eval transform and the predictor's fast path.

(The cached head stage is tested in test_headcache.py, the mixed-precision choice in test_hardware.py.)
"""

import numpy as np
import pytest
import torch
from PIL import Image

from attrclf import AttrConfig, Predictor
from attrclf.images import load_image
from attrclf.loader import collate
from attrclf.predict import FastEvalTransform
from attrclf.transforms import eval_transform


def test_channels_last_batches_hold_the_same_pixels():
    items = [{"pixel_values": torch.rand(3, 8, 6), "labels": [1, None]} for _ in range(3)]
    plain, targets, mask = collate(items)
    nhwc, targets2, mask2 = collate(items, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(plain, nhwc) and torch.equal(targets, targets2) and torch.equal(mask, mask2)


def _smooth_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    channels = [127 + 120 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


@pytest.mark.parametrize("size", [(300, 200), (64, 64), (201, 333)])
def test_fast_eval_transform_matches_timm_geometry_and_values(tmp_path, size):
    config = AttrConfig.for_backbone("resnet18", ["a"])  # 224 px, crop_pct 0.95, bicubic
    path = tmp_path / "x.png"
    _smooth_image(*size).save(path)
    fast = FastEvalTransform(config)
    got, expected = fast(fast.load(path)), eval_transform(config)(load_image(path))
    assert got.shape == expected.shape == (3, 224, 224)
    # at most a few uint8 levels of resampling rounding (one level is 1 / (255 * std) ~ 0.017), on average far less
    assert (got - expected).abs().max() < 0.08 and (got - expected).abs().mean() < 1e-3


def test_fast_eval_transform_decodes_large_jpegs_at_reduced_scale(tmp_path):
    config = AttrConfig.for_backbone("resnet18", ["a"])
    path = tmp_path / "big.jpg"
    _smooth_image(1600, 1200).save(path, quality=95)
    fast = FastEvalTransform(config)
    assert fast.load(path).size == (400, 300)  # 1/4 scale still covers the 313 x 235 resize
    got, expected = fast(fast.load(path)), eval_transform(config)(load_image(path))
    assert (got - expected).abs().mean() < 0.01
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: the reduced decode must cover the rotated resize
    _smooth_image(1600, 1200).save(path, quality=95, exif=exif)
    assert fast.load(path).size == (300, 400) and load_image(path).size == (1200, 1600)


def test_predictor_fast_path_gives_the_reference_probabilities(saved_model, tmp_path):
    folder = saved_model[0]
    path = tmp_path / "x.png"
    _smooth_image(90, 70).save(path)
    fast = Predictor.from_pretrained(str(folder), device="cpu").predict_probs([path])
    reference = Predictor.from_pretrained(str(folder), device="cpu", fast_preprocess=False,
                                          channels_last=False).predict_probs([path])
    np.testing.assert_allclose(fast, reference, atol=1e-3)
