"""attrclf.ema: the weight average equals a hand-computed one; training keeps the better of raw and averaged weights."""

import json

import pytest
import torch

from attrclf.config import TrainConfig
from attrclf.ema import make_ema, update_ema

from .conftest import tiny_config, tiny_split


def warmed_decay(step: int, cap: float) -> float:
    """timm's warm-up as attrclf configures it: 0 for the first step, then 1 - step^-3/4, capped."""
    return 0.0 if step <= 1 else min(cap, 1 - (1 + (step - 1)) ** -0.75)


def test_the_average_after_a_few_steps_equals_the_hand_computed_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, TrainConfig(ema_decay=0.5), "cpu")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an optimiser step, by hand
        update_ema(ema, model, step)
        decay = warmed_decay(step, 0.5)
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in model.state_dict().items()}
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
    # 0, then 1 - 2^-3/4, 1 - 3^-3/4, 1 - 10^-3/4
    assert [round(warmed_decay(s, 0.9998), 4) for s in (1, 2, 3, 10)] == [0.0, 0.4054, 0.5613, 0.8222]


def test_the_model_moves_to_the_training_device_before_it_is_copied():
    # the model is built on the CPU and `accelerator.prepare` moves it later: an average copied before that stayed on
    # the CPU and made the first optimiser step on a GPU fail ("Expected all tensors to be on the same device"). This
    # machine has no GPU, so a model that records its moves stands in: make_ema must move it to the device it is
    # given before the copy, and the copy must be in float32 with the moved weights.
    moves = []

    class Recording(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(args)
            return super().to(*args, **kwargs)

    model = Recording(3, 2, dtype=torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    device = torch.device("cpu")
    ema = make_ema(model, TrainConfig(ema_decay=0.5), device)
    assert moves[0] == (device,)
    assert {p.device for p in ema.module.parameters()} == {device}
    assert {p.dtype for p in ema.module.parameters()} == {torch.float32}
    torch.testing.assert_close(ema.module.weight, model.weight.float())
    assert optimizer.param_groups[0]["params"][0] is model.weight  # moved in place: the optimizer still holds it
    assert ema.foreach  # one device: timm's fused update


def test_no_average_with_decay_zero():
    assert make_ema(torch.nn.Linear(2, 2), TrainConfig(ema_decay=0.0), "cpu") is None
    update_ema(None, torch.nn.Linear(2, 2), 3)  # nothing to do, no error


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_an_impossible_decay_is_refused(value):
    from attrclf.errors import AttrclfError

    with pytest.raises(AttrclfError, match=r"--ema-decay must be in \[0, 1\), 0 = off"):
        TrainConfig(data="x", backbone_weights="w", ema_decay=value).resolve()


@pytest.mark.slow
def test_training_validates_both_weight_sets_and_names_the_kept_one(tmp_path, tiny_data):
    from accelerate import Accelerator

    from attrclf.engine import train_and_save

    cfg = tiny_config(tiny_data, tmp_path / "out", epochs=3, head_epochs=1, ema_decay=0.9)
    metrics = train_and_save(cfg, tiny_split(tiny_data), Accelerator(cpu=True))
    history = json.loads((tmp_path / "out" / "history.json").read_text())["epochs"]
    assert len(history["val_mAP_ema"]) == 3 and all(v is not None for v in history["val_mAP_ema"])
    best = metrics["best_epoch"] - 1
    kept = history["val_mAP_ema"][best] if metrics["weights"] == "ema" else history["val_mAP"][best]
    assert metrics["weights"] in ("raw", "ema") and metrics["ema_decay"] == 0.9
    assert kept == pytest.approx(max(max(history["val_mAP"]), max(history["val_mAP_ema"])))  # the better, kept
    assert metrics["validation"]["mAP"] == pytest.approx(kept)  # and those are the weights saved
