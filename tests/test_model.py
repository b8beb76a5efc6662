import json
from dataclasses import asdict

import pytest
import safetensors.torch
import timm
import torch

from attrclf import AttrClassifier, AttrclfError, AttrConfig
from attrclf.config import TrainConfig
from attrclf.heads import MLPHead
from attrclf.optim import current_lrs, make_optimizer, set_lrs


def test_save_load_gives_identical_logits_config_and_file_set(tmp_path, tiny_model_factory):
    model = tiny_model_factory(("a", "b", "c")).eval()
    model.config.thresholds = [0.2, 0.5, 0.8]
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = AttrClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert isinstance(loaded.config, AttrConfig)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["label_names"] == ["a", "b", "c"] and saved["backbone"] == "test_resnet"
    assert saved["thresholds"] == [0.2, 0.5, 0.8]
    assert not loaded.training


def test_loading_is_strict(tmp_path, tiny_model_factory):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    weights["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="extra.weight"):
        AttrClassifier.from_pretrained(tmp_path)
    del weights["extra.weight"], weights["head.0.weight"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="head.0.weight"):
        AttrClassifier.from_pretrained(tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path, tiny_model_factory):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(AttrclfError, match="no model.safetensors"):
        AttrClassifier.from_pretrained(tmp_path)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(AttrclfError, match="no attrclf config.json"):
        AttrClassifier.from_pretrained(tmp_path)


def test_from_pretrained_never_fetches_the_backbone(tmp_path, monkeypatch):
    config = AttrConfig.for_backbone("resnet18", ["x"], image_size=32)
    AttrClassifier(config).save_pretrained(tmp_path)
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    AttrClassifier.from_pretrained(tmp_path)
    assert calls and all(not k.get("pretrained") for k in calls)


def test_config_json_round_trip_has_lists():
    config = AttrConfig.for_backbone("test_resnet", ["a", "b"], image_size=48)
    assert config.input_size == [3, 48, 48]
    assert json.loads(json.dumps(asdict(config))) == asdict(config)
    assert AttrConfig(**asdict(config)) == config


def test_head_shapes():
    head = MLPHead(8, 3, hidden=0, dropout=0.1, hidden_dropout=0.1)
    assert [type(m).__name__ for m in head] == ["BatchNorm1d", "Dropout", "Linear"]
    head = MLPHead(8, 3, hidden=5, dropout=0.1, hidden_dropout=0.2)
    assert [type(m).__name__ for m in head] == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head[2].out_features == 5 and head[5].out_features == 3


def test_default_head_is_one_linear_and_a_model_saved_with_a_hidden_layer_still_loads(tmp_path):
    """The default head is BatchNorm1d - Dropout - Linear(A) in training and in AttrConfig alike; a model trained
    before that default (head_hidden 128 in its config.json) keeps its hidden layer when loaded."""
    assert TrainConfig().head_hidden == AttrConfig(["a"]).head_hidden == 0
    model = AttrClassifier(AttrConfig.for_backbone("test_resnet", ["a", "b"], image_size=32)).eval()
    assert [type(m).__name__ for m in model.head] == ["BatchNorm1d", "Dropout", "Linear"]
    assert model.head[2].in_features == 96 and model.head[2].out_features == 2
    older = AttrClassifier(AttrConfig.for_backbone("test_resnet", ["a", "b"], image_size=32, head_hidden=128)).eval()
    older.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["head_hidden"] == 128
    loaded = AttrClassifier.from_pretrained(tmp_path)
    assert loaded.head[2].out_features == 128 and loaded.head[5].out_features == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), older(x))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(AttrclfError, match="unknown backbone 'resnet19x'"):
        AttrConfig.for_backbone("resnet19x", ["a"])


def test_pretrained_download_failure_names_both_alternatives():
    config = AttrConfig.for_backbone("test_resnet", ["a"])
    with pytest.raises(AttrclfError) as info:
        AttrClassifier(config, pretrained=True)  # HF_HUB_OFFLINE=1 in tests: no download possible
    assert "--backbone-weights" in str(info.value) and "--no-pretrained" in str(info.value)


def test_backbone_weights_file_is_loaded(tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000)
    safetensors.torch.save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = AttrClassifier(AttrConfig.for_backbone("test_resnet", ["a"]),
                           backbone_weights=str(tmp_path / "w.safetensors"))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(AttrclfError, match="does not exist"):
        AttrClassifier(AttrConfig.for_backbone("test_resnet", ["a"]), backbone_weights=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- stages


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_step(model, cfg):
    optimizer = make_optimizer(model, cfg)
    model.train()
    logits = model(torch.randn(4, 3, 32, 32))
    logits.pow(2).mean().backward()
    optimizer.step()


def test_head_stage_trains_only_the_head(tiny_model_factory):
    model = tiny_model_factory()
    model.set_trainable(0)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    before_backbone, before_head = snapshot(model.backbone), snapshot(model.head)
    one_step(model, TrainConfig(unfreeze_stages="1").resolve())
    after = snapshot(model.backbone)
    for name, value in before_backbone.items():  # weights AND BatchNorm running statistics
        assert torch.equal(value, after[name]), name
    assert not torch.equal(before_head["2.weight"], snapshot(model.head)["2.weight"])


def test_warm_bn_stats_let_only_the_stages_to_unfreeze_follow_the_data_in_the_head_stage(tiny_model_factory):
    model = tiny_model_factory()
    model.warm_bn_stages = 1  # --warm-bn-stats with --unfreeze-stages 1
    model.set_trainable(0)
    before = snapshot(model.backbone)
    one_step(model, TrainConfig(unfreeze_stages="1").resolve())
    after = snapshot(model.backbone)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # layer4's running statistics moved, nothing else did: no weight of the frozen backbone changed
    assert changed and all(k.startswith("layer4.") and "running_" in k or k.endswith("num_batches_tracked")
                           for k in changed), changed
    assert any(k.startswith("layer4.") and k.endswith("running_mean") for k in changed)
    model.frozen_bn_stats = True  # --freeze-bn-stats wins: every statistic stays
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_finetune_stage_trains_exactly_the_last_stage(tiny_model_factory):
    model = tiny_model_factory()
    model.set_trainable(1)
    stages = model.backbone_stages()
    last = set(stages[-1])
    assert all(n.startswith("layer4.") for n in last)
    for name, param in model.backbone.named_parameters():
        assert param.requires_grad == (name in last), name
    before = snapshot(model.backbone)
    one_step(model, TrainConfig(unfreeze_stages="1").resolve())
    after = snapshot(model.backbone)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)


def test_two_stages_and_all(tiny_model_factory):
    model = tiny_model_factory()
    model.set_trainable(2)
    trainable = {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    model.set_trainable("all")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit", "test_convnext"])
def test_stages_work_for_other_backbones(backbone):
    model = AttrClassifier(AttrConfig.for_backbone(backbone, ["a", "b"], image_size=32))
    stages = model.backbone_stages()
    assert len(stages) >= 3
    model.set_trainable(1)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(stages[-1])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_optimizer_covers_head_and_unfreezable_tail(tiny_model_factory):
    model = tiny_model_factory()
    cfg = TrainConfig(unfreeze_stages="1", lr=1e-3, lr_finetune=1e-5).resolve()
    optimizer = make_optimizer(model, cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    expected = {id(p) for p in model.head.parameters()} | {
        id(p) for n, p in model.backbone.named_parameters() if n.startswith("layer4.")
    }
    assert in_optimizer == expected
    lrs = {(g["part"], g["weight_decay"] > 0): g["lr"] for g in optimizer.param_groups}
    assert lrs[("head", True)] == 1e-3 and lrs[("backbone", True)] == 1e-5
    assert all(p.ndim == 1 for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"])



def test_layer_decay_gives_each_stage_below_the_last_a_smaller_learning_rate(tiny_model_factory):
    model = tiny_model_factory()
    stages = model.backbone_stages()  # test_resnet: stem, layer1 .. layer4
    cfg = TrainConfig(unfreeze_stages="all", lr=1e-3, lr_finetune=1e-4, lr_layer_decay=0.5).resolve()
    optimizer = make_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.backbone.named_parameters())
    for depth, names in enumerate(reversed(stages)):  # the last stage at 1e-4, the one below at 5e-5, ...
        assert [lr_of[id(params[n])] for n in names] == pytest.approx([1e-4 * 0.5 ** depth] * len(names))
    assert {lr_of[id(p)] for p in model.head.parameters()} == {1e-3}
    set_lrs(optimizer, cfg, 0.1)  # the schedule scales every group, keeping the ratios
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(params[stages[0][0]])] == pytest.approx(1e-5 * 0.5 ** (len(stages) - 1))
    assert current_lrs(optimizer) == pytest.approx({"head": 1e-4, "backbone": 1e-5})  # the last stage's

# One stage means one resolution level in every family: the last is the stride-32 stage (ViT: the last quarter of
# its blocks), with the head convs / final norms that follow it; never a lone norm or a single 1x1 conv.
LAST_STAGE = {
    "test_resnet": ("layer4.",),
    "test_efficientnet": ("blocks.4.", "conv_head.", "bn2."),  # its stride-32 blocks and the head conv after them
    "mobilenetv3_small_050": ("blocks.4.", "blocks.5.", "conv_head."),
    "test_convnext": ("stages.3.", "head.norm."),  # timm's last coarse group is head.norm alone
    "test_vit": ("blocks.4.", "blocks.5.", "norm."),  # 6 blocks in depth quarters of 2: the last 2 and the final norm
}


@pytest.mark.parametrize("backbone", sorted(LAST_STAGE))
def test_one_stage_unfreezes_the_same_real_blocks_in_every_family(backbone):
    model = AttrClassifier(AttrConfig.for_backbone(backbone, ["a"], image_size=32))
    model.set_trainable(1)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(LAST_STAGE[backbone]) for n in trainable)
    assert all(any(n.startswith(prefix) for n in trainable) for prefix in LAST_STAGE[backbone])  # each part in it
    matrices = [p for p in model.backbone.parameters() if p.requires_grad and p.ndim > 1]
    assert len(matrices) >= 2  # real blocks: several weight tensors, not a norm's vectors
    stages = model.backbone_stages()
    assert sorted(sum(stages, [])) == sorted(n for n, _ in model.backbone.named_parameters())  # each param once
    model.set_trainable(2)  # two stages: strictly more, still ending with the last
    assert set(trainable) < {n for n, p in model.backbone.named_parameters() if p.requires_grad}


def test_stage_counts_by_family():
    counts = {name: len(AttrClassifier(AttrConfig.for_backbone(name, ["a"], image_size=32)).backbone_stages())
              for name in ("test_resnet", "test_convnext", "test_efficientnet", "test_vit")}
    assert counts == {"test_resnet": 4, "test_convnext": 4, "test_efficientnet": 5, "test_vit": 3}


def test_warm_bn_stats_is_the_default_and_setup_applies_it_unless_the_head_stage_is_cached(tiny_data, tmp_path):
    from accelerate import Accelerator

    from attrclf.config import parse_args
    from attrclf.engine import build_model, setup_training

    from .conftest import tiny_config, tiny_split

    assert parse_args([]).warm_bn_stats is True and parse_args(["--no-warm-bn-stats"]).warm_bn_stats is False
    data = tiny_split(tiny_data)
    for changes, stages in (({}, 1), ({"warm_bn_stats": False}, 0), ({"head_feature_cache": True}, 0)):
        cfg = tiny_config(tiny_data, tmp_path / "out", unfreeze_stages="1", head_epochs=1, epochs=2, **changes)
        model = build_model(cfg, data.label_names)
        setup_training(model, data, cfg, Accelerator(cpu=True))
        assert model.warm_bn_stages == stages, changes


def test_drop_path_rises_with_depth_acts_only_in_training_and_is_never_saved(tmp_path):
    """--drop-path 0.3 on test_resnet (3 residual blocks): timm's rates 0.1, 0.2, 0.3; in train mode two passes over the
    same batch differ, in eval mode the model equals one built without it on the same weights; config.json does not
    carry it, and the saved weights load strictly into a plain model."""
    from timm.layers import DropPath

    config = AttrConfig.for_backbone("test_resnet", ["a", "b"], image_size=32, head_hidden=8)
    torch.manual_seed(0)
    model = AttrClassifier(config, drop_path=0.3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.1, 0.2, 0.3])
    for module in model.modules():  # timm starts each branch's last BatchNorm at 0, where a dropped branch adds nothing
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    plain = AttrClassifier(config)
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        # the backbones alone (the head's dropout differs between passes anyway): in train mode BatchNorm gives the
        # same for the same batch, so only the drops can make two passes differ
        model.train()
        plain.train()
        outputs = {}
        for name, net in (("drop", model.backbone), ("plain", plain.backbone)):
            torch.manual_seed(1)
            first = net(x)
            torch.manual_seed(2)
            outputs[name] = torch.equal(first, net(x))
        assert outputs == {"drop": False, "plain": True}
    model.eval()  # (the train-mode passes moved its BatchNorm statistics)
    model.save_pretrained(tmp_path)
    assert "drop_path" not in (tmp_path / "config.json").read_text()
    with torch.no_grad():
        assert torch.equal(AttrClassifier.from_pretrained(tmp_path)(x), model(x))


def test_drop_path_on_a_family_without_stochastic_depth_is_a_clear_error():
    with pytest.raises(AttrclfError, match=r"--drop-path: backbone 'vgg11' has no stochastic depth.*--drop-path 0"):
        AttrClassifier(AttrConfig.for_backbone("vgg11", ["a"], image_size=32), drop_path=0.1)
