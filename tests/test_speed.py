"""The speed work keeps the answers: cached head stage, channels_last batches, mixed-precision choice."""

import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from attrclf import AttrConfig, Predictor
from attrclf.data import collate, eval_transform, load_image, make_loader, prepare_data
from attrclf.engine import (
    CachedHeadStage,
    TrainConfig,
    evaluate,
    make_optimizer,
    resolve_mixed_precision,
    uses_feature_cache,
)
from attrclf.losses import build_loss
from attrclf.predict import FastEvalTransform

from .conftest import write_labels_dataset


@pytest.fixture
def setup(tmp_path, tiny_model_factory):
    lines = ["img a b"] + [f"i{n:02d}.png {n % 2} {'NA' if n % 3 == 0 else (n // 2) % 2}" for n in range(20)]
    data = prepare_data(write_labels_dataset(tmp_path / "d", lines), val_fraction=0.25, seed=0)
    cfg = TrainConfig(data="x", backbone="test_resnet", image_size=32, batch_size=32, num_workers=0, head_epochs=1,
                      unfreeze_stages="1", lr=1e-2, lr_finetune=1e-4, epochs=2, pretrained=True).resolve()
    model = tiny_model_factory(("a", "b"), seed=1)
    model.head[1].p = model.head[4].p = 0.0  # no dropout: the step is deterministic
    model.set_trainable(0)
    return data, cfg, model, build_loss("bce", torch.tensor([1.0, 2.0]))


def test_cached_validation_equals_the_whole_model(setup):
    data, cfg, model, loss_fn = setup
    accelerator = Accelerator(cpu=True)
    val_loader = make_loader(data.validation, eval_transform(model.config), 4, False)
    state = {"step": 0, "history": {"iterations": {"step": [], "epoch": [], "loss": []}}}
    _, cached = CachedHeadStage(data, cfg).run_epoch(model, make_optimizer(model, cfg), val_loader, loss_fn,
                                                     accelerator, state, 0)
    reference = evaluate(model, val_loader, loss_fn, accelerator)  # the whole model, after the same head epoch
    assert cached[0] == pytest.approx(reference[0], abs=1e-5)
    for got, expected in zip(cached[1:], reference[1:]):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_cached_head_step_equals_a_step_on_eval_features(setup):
    data, cfg, model, loss_fn = setup
    accelerator = Accelerator(cpu=True)
    manual = copy.deepcopy(model)
    # by hand: the frozen backbone (eval mode) on the un-augmented training images, then one step of the head
    pixels = torch.stack([eval_transform(model.config)(load_image(s)) for s in data.train["image"]])
    _, targets, mask = collate([{"pixel_values": p, "labels": y} for p, y in zip(pixels, data.train["labels"])])
    with torch.no_grad():
        features = manual.backbone.eval()(pixels)
    optimizer = make_optimizer(manual, cfg)
    manual.head.train()
    loss = loss_fn(manual.head(features), targets, mask)
    loss.backward()
    optimizer.step()

    state = {"step": 0, "history": {"iterations": {"step": [], "epoch": [], "loss": []}}}
    val_loader = make_loader(data.validation, eval_transform(model.config), 4, False)
    train_loss, _ = CachedHeadStage(data, cfg).run_epoch(
        model, make_optimizer(model, cfg), val_loader, loss_fn, accelerator, state, 0)
    assert state["step"] == 1 and train_loss == pytest.approx(loss.item(), abs=1e-5)
    # gradients, not weights: Adam's first step is about lr * sign(gradient), which turns rounding noise in a
    # near-zero gradient into a full step
    for (name, got), expected in zip(model.head.named_parameters(), manual.head.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-6, rtol=1e-4, msg=name)
    for got, expected in zip(model.head.buffers(), manual.head.buffers()):  # BatchNorm1d saw the same batch
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not any(p.grad is not None for p in model.backbone.parameters())


def test_feature_cache_only_when_there_is_a_head_stage():
    base = {"data": "x", "backbone_weights": "w"}
    assert uses_feature_cache(TrainConfig(**base).resolve())
    assert not uses_feature_cache(TrainConfig(**base, head_feature_cache=False).resolve())
    assert not uses_feature_cache(TrainConfig(**base, head_epochs=0).resolve())
    assert not uses_feature_cache(TrainConfig().resolve())  # the demo trains from scratch: no head-only stage


def test_channels_last_batches_hold_the_same_pixels():
    items = [{"pixel_values": torch.rand(3, 8, 6), "labels": [1, None]} for _ in range(3)]
    plain, targets, mask = collate(items)
    nhwc, targets2, mask2 = collate(items, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(plain, nhwc) and torch.equal(targets, targets2) and torch.equal(mask, mask2)


def test_mixed_precision_auto_uses_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    capabilities = {"avx2": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_mixed_precision("auto") == "no"
    capabilities["amx_bf16"] = True
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto") is None  # `accelerate launch --mixed_precision fp16` decides


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
