"""The head-only stage on cached backbone features gives the whole model's answers, and runs only where it can."""

import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from attrclf.config import TrainConfig
from attrclf.engine import evaluate
from attrclf.headcache import CachedHeadStage, uses_feature_cache
from attrclf.images import load_image
from attrclf.loader import collate, make_loader
from attrclf.losses import build_loss
from attrclf.optim import make_optimizer
from attrclf.sources import prepare_data
from attrclf.state import RunState
from attrclf.transforms import eval_transform

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
    _, validations = CachedHeadStage(data, cfg).run_epoch(model, make_optimizer(model, cfg), val_loader, loss_fn,
                                                          accelerator=accelerator, state=RunState(), epoch=0)
    assert list(validations) == ["raw"]  # no weight average given
    cached = validations["raw"]
    reference = evaluate(model, val_loader, loss_fn, accelerator)  # the whole model, after the same head epoch
    assert cached.loss == pytest.approx(reference.loss, abs=1e-5)
    for name in ("probs", "targets", "mask"):
        np.testing.assert_allclose(getattr(cached, name), getattr(reference, name), atol=1e-5)


def test_a_cached_head_step_equals_a_step_on_eval_features(setup):
    data, cfg, model, loss_fn = setup
    accelerator = Accelerator(cpu=True)
    manual = copy.deepcopy(model)
    # by hand: the frozen backbone (eval mode) on the un-augmented training images, then one step of the head
    pixels = torch.stack([eval_transform(model.config)(load_image(s)) for s in data.train["image"]])
    _, targets, mask = collate([{"pixel_values": p, "labels": y}
                                for p, y in zip(pixels, data.train["labels"], strict=True)])
    with torch.no_grad():
        features = manual.backbone.eval()(pixels)
    optimizer = make_optimizer(manual, cfg)
    manual.head.train()
    loss = loss_fn(manual.head(features), targets, mask)
    loss.backward()
    optimizer.step()

    state = RunState()
    val_loader = make_loader(data.validation, eval_transform(model.config), 4, False)
    train_loss, _ = CachedHeadStage(data, cfg).run_epoch(
        model, make_optimizer(model, cfg), val_loader, loss_fn, accelerator=accelerator, state=state, epoch=0)
    assert state.step == 1 and train_loss == pytest.approx(loss.item(), abs=1e-5)
    # gradients, not weights: Adam's first step is about lr * sign(gradient), which turns rounding noise in a
    # near-zero gradient into a full step
    for (name, got), expected in zip(model.head.named_parameters(), manual.head.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-6, rtol=1e-4, msg=name)
    # BatchNorm1d saw the same batch
    for got, expected in zip(model.head.buffers(), manual.head.buffers(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not any(p.grad is not None for p in model.backbone.parameters())


def test_feature_cache_only_when_asked_and_there_is_a_head_stage():
    assert not uses_feature_cache(TrainConfig(data="x", backbone_weights="w").resolve())  # off by default
    base = {"data": "x", "backbone_weights": "w", "head_feature_cache": True}
    assert uses_feature_cache(TrainConfig(**base).resolve())
    assert not uses_feature_cache(TrainConfig(**{**base, "head_feature_cache": False}).resolve())
    assert not uses_feature_cache(TrainConfig(**base, head_epochs=0).resolve())
    assert not uses_feature_cache(TrainConfig().resolve())  # the demo trains from scratch: no head-only stage
