"""The query head as a model option: config.json, strict save -> load, features, ONNX, the cached head stage."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from accelerate import Accelerator

from attrclf import AttrClassifier, AttrclfError, AttrConfig
from attrclf.config import parse_args
from attrclf.engine import build_model, evaluate
from attrclf.headcache import CachedHeadStage, uses_feature_cache
from attrclf.heads import MLPHead, QueryHead
from attrclf.loader import make_loader
from attrclf.losses import build_loss
from attrclf.optim import make_optimizer
from attrclf.state import RunState
from attrclf.transforms import eval_transform

from .conftest import tiny_config, tiny_split

QUERY = {"head_type": "query", "query_dim": 16, "query_heads": 2, "query_layers": 2}


def query_model(label_names=("a", "b", "c"), image_size=64, seed=0):
    torch.manual_seed(seed)
    return AttrClassifier(AttrConfig.for_backbone("test_resnet", list(label_names), image_size=image_size, **QUERY))


def test_query_head_save_load_gives_identical_logits_and_an_equal_config(tmp_path):
    model = query_model().eval()  # 64 px: a 2x2 feature map, so the head attends over 4 positions
    model.config.thresholds = [0.2, 0.5, 0.8]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ("head_type", "query_dim", "query_heads", "query_layers", "query_dropout")} == {
        **QUERY, "query_dropout": 0.1}
    loaded = AttrClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config and isinstance(loaded.head, QueryHead) and len(loaded.head.layers) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["head.queries"]  # strict: a missing query tensor is an error, not a fresh random query
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="head.queries"):
        AttrClassifier.from_pretrained(tmp_path)


def test_an_old_config_json_without_head_fields_loads_into_the_mlp_head(tmp_path, tiny_model_factory):
    model = tiny_model_factory(("a", "b")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in saved.items() if not k.startswith("query_") and k != "head_type"}
    (tmp_path / "config.json").write_text(json.dumps(old))  # as attrclf wrote it before the query head
    loaded = AttrClassifier.from_pretrained(tmp_path)
    assert isinstance(loaded.head, MLPHead) and loaded.config.head_type == "mlp" and loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_features_are_pooled_for_the_mlp_and_unpooled_for_the_query_head(tiny_model_factory):
    x = torch.randn(2, 3, 64, 64)
    mlp, query = tiny_model_factory(image_size=64).eval(), query_model().eval()
    with torch.no_grad():
        assert mlp.features(x).shape == (2, 96)
        assert torch.equal(mlp.features(x), mlp.backbone(x))
        assert query.features(x).shape == (2, 96, 2, 2)
        assert torch.equal(query(x), query.head(query.backbone.forward_features(x)))


@pytest.mark.parametrize("backbone, shape", [("test_vit", (2, 5, 64)), ("test_convnext", (2, 64, 1, 1))])
def test_query_head_on_tokens_and_other_families(backbone, shape):
    model = AttrClassifier(AttrConfig.for_backbone(backbone, ["a", "b"], image_size=32, **QUERY)).eval()
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, 32, 32)).shape == shape
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_an_nhwc_backbone_gives_the_query_head_a_channels_first_map():
    model = AttrClassifier(AttrConfig.for_backbone("test_resnet", ["a"], image_size=64, **QUERY)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.features(x)
        model.backbone.output_fmt = "NHWC"  # as timm's Swin says of its forward_features
        real = model.backbone.forward_features
        model.backbone.forward_features = lambda pixels: real(pixels).permute(0, 2, 3, 1)
        assert torch.equal(model.features(x), expected)


def test_the_mlp_head_reads_the_pooled_width_where_timm_adds_a_layer_after_pooling():
    # MobileNetV3: forward_features has 576 channels, the pooled output (conv_head) 1024
    model = AttrClassifier(AttrConfig.for_backbone("mobilenetv3_small_100", ["a", "b"], image_size=64)).eval()
    assert model.backbone.num_features == 576 and model.head[0].num_features == 1024
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


def test_bad_head_settings_are_clear_errors():
    with pytest.raises(AttrclfError, match="unknown head type 'gap'.*mlp, query"):
        AttrConfig(label_names=["a"], head_type="gap")
    with pytest.raises(AttrclfError, match="--query-dim.*--query-heads"):
        AttrConfig(label_names=["a"], head_type="query", query_dim=10, query_heads=4)
    with pytest.raises(SystemExit):
        parse_args(["--head", "gap"])


def test_head_flags_reach_the_model_config(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path, head="query", query_dim=8, query_heads=2, query_layers=3)
    model = build_model(cfg, ["a", "b"])
    assert (model.config.head_type, model.config.query_dim, model.config.query_heads,
            model.config.query_layers) == ("query", 8, 2, 3)
    assert isinstance(model.head, QueryHead) and len(model.head.layers) == 3
    parsed = parse_args(["--head", "query", "--query-dim", "32", "--query-heads", "8", "--query-layers", "2"])
    assert (parsed.head, parsed.query_dim, parsed.query_heads, parsed.query_layers) == ("query", 32, 8, 2)
    assert parse_args([]).head == "mlp"


@pytest.mark.slow  # the torch.export-based ONNX exporter takes a few seconds
def test_onnx_export_of_a_query_head_model_matches_pytorch(tmp_path):
    from attrclf.export import export_onnx, max_abs_diff

    model = query_model().eval()
    diffs = export_onnx(model, tmp_path / "m.onnx")
    assert set(diffs) == {1, 3} and max(diffs.values()) < 1e-4
    assert max_abs_diff(model, tmp_path / "m.onnx", batch_sizes=(2,), seed=5)[2] < 1e-4  # other pixels, batch 2


# ---------------------------------------------------------------- the cached head stage with the query head


def test_cached_head_stage_trains_a_query_head_and_validates_like_the_whole_model(tmp_path, tiny_data):
    data = tiny_split(tiny_data)
    cfg = tiny_config(tiny_data, tmp_path, head_epochs=1, unfreeze_stages="1", lr=1e-2,
                      batch_size=16, image_size=64, head="query", query_dim=16, query_heads=2, head_feature_cache=True)
    assert uses_feature_cache(cfg)
    model = build_model(cfg, data.label_names)
    model.set_trainable(0)
    accelerator, loss_fn = Accelerator(cpu=True), build_loss("bce", torch.tensor([1.0, 2.0, 1.0]))
    stage = CachedHeadStage(data, cfg)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    val_loader = make_loader(data.validation, eval_transform(model.config), 4, False)
    state = RunState()
    train_loss, validations = stage.run_epoch(model, make_optimizer(model, cfg), val_loader, loss_fn,
                                              accelerator=accelerator, state=state, epoch=0)
    cached = validations["raw"]
    # the cache holds the unpooled 2x2 maps the query head reads, 96 x 2 x 2 floats per image
    assert stage.train_set.features.shape == (len(data.train), 96, 2, 2)
    assert state.step == len(data.train) // 16 and np.isfinite(train_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.head.state_dict().items())  # the head trained
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())
    reference = evaluate(model, val_loader, loss_fn, accelerator)  # the whole model after the same head epoch
    assert cached.loss == pytest.approx(reference.loss, abs=1e-5)
    for name in ("probs", "targets", "mask"):
        np.testing.assert_allclose(getattr(cached, name), getattr(reference, name), atol=1e-5)


def test_the_card_names_the_head():
    from attrclf.card import head_description

    query = asdict(query_model().config)
    assert head_description(query) == (
        "attribute queries (`--head query`): one learned 16-wide query per attribute, 2 decoder layer(s) in which the "
        "queries attend to each other and, with 2 attention heads, to every position of the backbone's unpooled "
        "feature map (dropout 0.1); each query's output gives its own attribute's logit")
    mlp = asdict(AttrConfig(["a", "b"], head_hidden=0))
    assert head_description(mlp) == "BatchNorm1d - Dropout(0.5) - Linear(2) on the pooled features (`--head mlp`)"
    old = {k: v for k, v in asdict(AttrConfig(["a"], head_hidden=128)).items()
           if k != "head_type"}  # config.json before the field
    assert head_description(old).startswith(
        "BatchNorm1d - Dropout(0.5) - Linear(128) - ReLU - Dropout(0.3) - Linear(1)")


def test_timm_test_resnet_has_the_shapes_these_tests_assume():
    backbone = timm.create_model("test_resnet", num_classes=0)
    assert backbone.num_features == 96


def test_a_query_head_run_trains_both_stages_saves_loads_strictly_and_its_card_names_the_head(tmp_path, tiny_data):
    from pathlib import Path

    from attrclf.engine import fit
    from attrclf.reporting import finalize, write_outputs

    data = tiny_split(tiny_data)
    cfg = tiny_config(tiny_data, tmp_path, epochs=2, head_epochs=1, unfreeze_stages="1", keep_checkpoints=0,
                      head="query", query_dim=16, query_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg, data.label_names)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    layer4_before = {k: v.clone() for k, v in model.backbone.layer4.state_dict().items()}
    result = fit(model, data, cfg, Accelerator(cpu=True))
    assert [e.stage for e in result.history.epochs] == ["head", "finetune"]
    # the model holds the last epoch's weights: the head and, in the fine-tuning epoch, the last stage trained
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    assert any(not torch.equal(layer4_before[k], v) for k, v in model.backbone.layer4.state_dict().items())
    metrics = finalize(model, result, data, cfg)
    write_outputs(model, metrics, result, cfg=cfg, output_dir=Path(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "- Head: attribute queries (`--head query`): one learned 16-wide query per attribute" in card
    loaded = AttrClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.head_type == "query"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
