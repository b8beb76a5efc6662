"""The schedule: the stage of each epoch and the learning-rate factor at each step, by hand."""

import math

import pytest
import torch

from attrclf.config import TrainConfig
from attrclf.optim import current_lrs, lr_factor, set_lrs, stage_at


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"data": "x", "backbone_weights": "w", "epochs": 5, "head_epochs": 2, "lr": 1e-2,
                          "lr_finetune": 1e-4, **changes}).resolve()


def test_stages_by_epoch():
    cfg = config()
    assert [stage_at(e, cfg) for e in range(5)] == ["head", "head", "finetune", "finetune", "finetune"]
    assert [stage_at(e, config(unfreeze_stages="0")) for e in range(5)] == ["head"] * 5  # nothing unfreezes
    assert [stage_at(e, config(head_epochs=0)) for e in range(2)] == ["finetune"] * 2


def test_lr_factor_is_constant_then_a_cosine_to_five_percent():
    cfg = config(switch_warmup=0)  # 2 head epochs, then 3 fine-tuning epochs of 10 steps: the cosine spans 20..50
    assert [lr_factor(s, 10, cfg) for s in (0, 19)] == [1.0, 1.0]
    assert lr_factor(20, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(35, 10, cfg) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(50, 10, cfg) == pytest.approx(0.05) and lr_factor(80, 10, cfg) == pytest.approx(0.05)
    assert lr_factor(35, 10, config(unfreeze_stages="0")) == 1.0


def test_the_switch_warms_both_learning_rates_up_linearly():
    cfg = config(switch_warmup=1.0)  # the first fine-tuning epoch (steps 20..29) ramps up to the cosine
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - 20) / 30)) for s in range(20, 31)]
    assert [lr_factor(s, 10, cfg) for s in (0, 19)] == [1.0, 1.0]  # the head stage is untouched
    assert lr_factor(20, 10, cfg) == pytest.approx(cosine[0] * 1 / 10)  # the step right after the switch
    assert lr_factor(24, 10, cfg) == pytest.approx(cosine[4] * 5 / 10)
    assert lr_factor(29, 10, cfg) == pytest.approx(cosine[9] * 10 / 10)
    assert lr_factor(30, 10, cfg) == pytest.approx(cosine[10])  # warm-up over: the plain cosine
    half = config(switch_warmup=0.5)
    assert lr_factor(22, 10, half) == pytest.approx(cosine[2] * 3 / 5) and lr_factor(25, 10, half) == pytest.approx(
        cosine[5])


def test_set_lrs_scales_each_parts_base_rate():
    head, backbone = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [head], "part": "head"}, {"params": [backbone], "part": "backbone"}])
    set_lrs(optimizer, config(), 0.5)
    assert current_lrs(optimizer) == pytest.approx({"head": 5e-3, "backbone": 5e-5})


def test_no_switch_warmup_head_warms_up_only_the_backbone():
    cfg = config(head_epochs=2, epochs=6, switch_warmup=1.0, switch_warmup_head=False)
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / 40)) for k in range(41)]
    assert lr_factor(20, 10, cfg) == pytest.approx(cosine[0] / 10)  # the backbone ramps from 1/10
    assert lr_factor(20, 10, cfg, part="head") == pytest.approx(cosine[0])  # the head keeps its schedule
    assert lr_factor(24, 10, cfg, part="head") == pytest.approx(cosine[4])
    assert lr_factor(5, 10, cfg, part="head") == 1.0  # the head stage: constant
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0, "part": "head"},
                                 {"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0, "part": "backbone"}])
    set_lrs(optimizer, cfg, 0.1, 0.9)
    assert current_lrs(optimizer) == pytest.approx({"head": cfg.lr * 0.9, "backbone": cfg.lr_finetune * 0.1})


def test_the_plateau_anneal_bends_the_schedule_down_to_its_floor():
    """--early-stop-anneal: from the plateau's step, a half cosine from the factor there to 0.05 over its epochs;
    before that step the schedule is untouched, and the head follows its own schedule's value down the same way."""
    cfg = config(head_epochs=2, epochs=12, switch_warmup=1.0, switch_warmup_head=False)
    anneal = {"step": 50, "epoch": 5, "epochs": 2}  # 5 epochs of 10 steps done; 2 more
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / 100)) for k in range(101)]  # 10 fine-tuning epochs
    begin = cosine[30]  # 3 fine-tuning epochs in, warm-up over: the backbone's and the head's factor agree
    assert lr_factor(49, 10, cfg, anneal=anneal) == pytest.approx(cosine[29])  # before the plateau: as without
    assert lr_factor(50, 10, cfg, anneal=anneal) == pytest.approx(begin)
    assert lr_factor(60, 10, cfg, anneal=anneal) == pytest.approx(0.05 + (begin - 0.05) * 0.5)  # half-way
    assert lr_factor(65, 10, cfg, anneal=anneal) == pytest.approx(
        0.05 + (begin - 0.05) * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(70, 10, cfg, anneal=anneal) == pytest.approx(0.05)
    assert lr_factor(90, 10, cfg, anneal=anneal) == pytest.approx(0.05)  # never below the floor
    assert lr_factor(60, 10, cfg, part="head", anneal=anneal) == pytest.approx(0.05 + (begin - 0.05) * 0.5)
    # inside the switch warm-up the backbone's factor is its ramped value, and the anneal starts from that
    early = {"step": 25, "epoch": 2, "epochs": 1}
    ramped = cosine[5] * 6 / 10
    assert lr_factor(25, 10, cfg, anneal=early) == pytest.approx(ramped)
    assert lr_factor(35, 10, cfg, anneal=early) == pytest.approx(min(ramped, 0.05))
    # head-only training (nothing unfreezes) anneals from its constant 1
    assert lr_factor(60, 10, config(unfreeze_stages="0"), anneal=anneal) == pytest.approx(0.05 + 0.95 * 0.5)
