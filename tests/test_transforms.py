"""attrclf.transforms: timm's transforms from the model config, and the fast eval path's geometry on hand examples.

The fast path against timm's on real images: tests/test_speed.py.
"""

import dataclasses

import pytest
import torch
from PIL import Image

from attrclf import predict
from attrclf.model import AttrConfig
from attrclf.transforms import PIL_FILTERS, FastEvalTransform, eval_transform, train_transform


@pytest.fixture
def config():
    return AttrConfig.for_backbone("test_resnet", ["a"], image_size=32)  # mean = std = 0.5, crop_pct 0.95, bilinear


def test_eval_transform_normalises_with_the_config(config):
    image = Image.new("RGB", (50, 40), (255, 0, 51))  # 51 / 255 = 0.2
    x = eval_transform(config)(image)
    assert x.shape == (3, 32, 32)
    expected = torch.tensor([(1 - 0.5) / 0.5, (0 - 0.5) / 0.5, (0.2 - 0.5) / 0.5]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(x, expected, atol=1e-6)


def test_train_transform_is_random_but_keeps_the_shape(config):
    torch.manual_seed(0)
    transform = train_transform(config, crop_scale=0.3, hflip=0.5, color_jitter=0.0, random_erasing=0.0)
    image = Image.linear_gradient("L").convert("RGB").resize((40, 40))
    crops = torch.stack([transform(image) for _ in range(4)])
    assert crops.shape == (4, 3, 32, 32) and not torch.equal(crops[0], crops[1])
    with pytest.raises(TypeError):
        train_transform(config, 0.5)  # augmentation strengths are passed by name


def test_fast_eval_transform_geometry_by_hand(config):
    fast = FastEvalTransform(config)
    assert fast.scale_size == 33  # floor(32 / 0.95)
    assert fast.resized_size(100, 50) == (66, 33) and fast.resized_size(50, 100) == (33, 66)
    # resized 66 x 33, crop 32 x 32 from left round(17) = 17, top round(0.5) = 0; back in source pixels (x100/66)
    left, top, right, bottom = fast.crop_box(100, 50)
    assert (left, top) == pytest.approx((17 * 100 / 66, 0.0))
    assert (right, bottom) == pytest.approx((49 * 100 / 66, 32 * 50 / 33))
    x = fast(Image.new("RGB", (100, 50), (255, 0, 51)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, -0.6]), atol=1e-6)


def test_fast_eval_transform_supports_center_crops_of_known_filters(config):
    assert FastEvalTransform.supports(config)
    assert set(PIL_FILTERS) == {"bicubic", "bilinear", "nearest", "lanczos"}
    assert not FastEvalTransform.supports(dataclasses.replace(config, crop_mode="squash"))
    assert not FastEvalTransform.supports(dataclasses.replace(config, interpolation="random"))


def test_predict_uses_the_transforms_module():
    assert predict.FastEvalTransform is FastEvalTransform and predict.eval_transform is eval_transform
