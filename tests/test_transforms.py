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
    """The "crop" geometry: mean = std = 0.5, centre crop_pct 0.95, bilinear."""
    return AttrConfig.for_backbone("test_resnet", ["a"], image_size=32, geometry="crop")


@pytest.fixture
def whole():
    """The default geometry: the whole image squashed to 32 x 32."""
    return AttrConfig.for_backbone("test_resnet", ["a"], image_size=32)


def marked(size=(100, 60), corner=(0, 0), mark=6) -> Image.Image:
    """Grey image with a red square mark of `mark` pixels at `corner` (0 or 1 per axis: left/right, top/bottom)."""
    image = Image.new("RGB", size, (128, 128, 128))
    x = 0 if corner[0] == 0 else size[0] - mark
    y = 0 if corner[1] == 0 else size[1] - mark
    image.paste((255, 0, 0), (x, y, x + mark, y + mark))
    return image


def red_pixels(x: torch.Tensor) -> int:
    """Pixels of a (3, H, W) tensor normalised with mean = std = 0.5 that are clearly red (red well above green:
    grey has none, and brightness / contrast / saturation jitter keeps the mark's red far above its green)."""
    return int((x[0] - x[1] > 1.0).sum())


def test_new_models_see_the_whole_image(whole):
    assert (whole.crop_mode, whole.crop_pct, whole.geometry) == ("squash", 1.0, "whole")


@pytest.mark.parametrize("corner", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_a_mark_in_a_corner_stays_visible_at_evaluation(whole, config, corner):
    image = marked(corner=corner)  # 100 x 60: a 6 px mark is ~2 output pixels wide after the squash to 32
    assert red_pixels(eval_transform(whole)(image)) >= 2
    assert red_pixels(FastEvalTransform(whole)(image)) >= 2
    assert red_pixels(eval_transform(config)(image)) == 0  # the centre crop of the "crop" geometry cuts it away


def test_whole_image_training_never_crops_the_mark_away(whole):
    torch.manual_seed(0)
    transform = train_transform(whole, crop_scale=0.3, hflip=0.5, color_jitter=0.3, random_erasing=0.0)
    draws = [transform(marked(corner=(1, 1))) for _ in range(20)]
    assert all(x.shape == (3, 32, 32) for x in draws)
    assert all(red_pixels(x) >= 2 for x in draws)  # flipped or not, jittered or not: always in view
    flipped = [bool(red_pixels(x[:, :, :16]) > 0) for x in draws]  # the mark moved to the left half
    assert 0 < sum(flipped) < 20


def test_fast_eval_transform_squash_equals_timms(whole):
    image = Image.linear_gradient("L").convert("RGB").resize((90, 50))
    fast, reference = FastEvalTransform(whole)(image), eval_transform(whole)(image)
    assert fast.shape == reference.shape == (3, 32, 32)
    assert (fast - reference).abs().mean() < 0.02  # resampling rounding only (one uint8 level is 0.008 here)
    assert FastEvalTransform(whole).crop_box(90, 50) == pytest.approx((0.0, 0.0, 90.0, 50.0))


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
    assert FastEvalTransform.supports(dataclasses.replace(config, crop_mode="squash"))
    assert not FastEvalTransform.supports(dataclasses.replace(config, crop_mode="border"))
    assert not FastEvalTransform.supports(dataclasses.replace(config, interpolation="random"))


def test_predict_uses_the_transforms_module():
    assert predict.FastEvalTransform is FastEvalTransform and predict.eval_transform is eval_transform


def test_the_geometry_flag_reaches_the_model_config():
    from attrclf.engine import build_model

    from .conftest import tiny_config
    for geometry, crop_mode in (("crop", "center"), ("whole", "squash")):
        cfg = tiny_config("unused", "unused", geometry=geometry)
        assert build_model(cfg, ["a"]).config.crop_mode == crop_mode, geometry
