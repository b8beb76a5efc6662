"""The model card (attrclf/card.py): rendered in process from config / metrics / train_config, no network."""

import json
from dataclasses import asdict

import pytest
from huggingface_hub import ModelCard

from attrclf import AttrConfig, __version__, card
from attrclf.card import backbone_origin, render_card
from attrclf.config import TrainConfig

from .conftest import REPO


def test_card_of_a_model_saved_outside_training(tmp_path, tiny_model_factory):
    model = tiny_model_factory(("smiling", "hat"))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "attrclf" and card.data.eval_results is None
    assert "`smiling`, `hat`" in card.text and "Not recorded" in card.text and "PytorchModelHubMixin" not in card.text
    (tmp_path / "README.md").write_text("my card")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my card"  # a rendered card is never overwritten


@pytest.mark.parametrize("train_config, base_model, origin", [
    ({"backbone": "resnet18", "pretrained": True}, "timm/resnet18.a1_in1k", "[`timm/resnet18.a1_in1k`]"),
    ({"backbone": "resnet18", "pretrained": True, "backbone_weights": "/w/imagenet.pth"}, None,
     "pretrained weights from the local file `imagenet.pth`"),
    ({"backbone": "resnet18", "pretrained": False}, None, "random initial weights (trained from scratch)"),
])
def test_base_model_only_when_timm_weights_were_downloaded(train_config, base_model, origin):
    card = render_card(asdict(AttrConfig(["a"], backbone="resnet18")), train_config=train_config)
    assert card.data.base_model == base_model
    assert origin in backbone_origin(train_config)


def test_hub_dataset_id_is_named_in_the_card():
    assert TrainConfig(data="someone/faces").resolve().dataset_id == "someone/faces"
    assert TrainConfig(data=str(REPO)).resolve().dataset_id is None
    assert TrainConfig().resolve().dataset_id is None


def test_the_card_names_the_attrclf_version_that_saved_the_model(tmp_path, tiny_model_factory):
    model = tiny_model_factory(("smiling", "hat"))
    assert model.config.attrclf_version == __version__
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attrclf_version"] == __version__
    assert f"Saved by attrclf {__version__}." in ModelCard.load(tmp_path / "README.md").text
    older = render_card({**asdict(model.config), "attrclf_version": "0.0.9"})
    assert "Saved by attrclf 0.0.9." in older.text


def test_a_config_json_without_a_version_still_loads(tmp_path, tiny_model_factory):
    from attrclf import AttrClassifier

    model = tiny_model_factory(("smiling", "hat"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attrclf_version"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AttrClassifier.from_pretrained(str(tmp_path))
    assert loaded.config.label_names == ["smiling", "hat"] and loaded.config.attrclf_version == __version__


def test_the_template_comes_from_the_package_when_installed(tmp_path, monkeypatch):
    assert card.card_template() == (REPO / "hub_card.md").read_text()  # a checkout: no copy inside attrclf/
    (tmp_path / "hub_card.md").write_text("---\n{{ card_data }}\n---\n\npackaged template for {{ config.backbone }}\n")
    monkeypatch.setattr(card.resources, "files", lambda package: tmp_path)
    rendered = render_card(asdict(AttrConfig(["a"], backbone="resnet18")))
    assert rendered.text.strip() == "packaged template for resnet18"


def test_loss_average_attributes_trains_and_the_card_says_so(tiny_data, tmp_path):
    from accelerate import Accelerator

    from attrclf.engine import train_and_save

    from .conftest import tiny_config, tiny_split

    # an fp32 accelerator, as the other in-process runs use (auto would pick bf16 on an AVX512-BF16 CPU, and the
    # accelerator's state outlives the test)
    cfg = tiny_config(tiny_data, tmp_path, loss_average="attributes", epochs=1)
    metrics = train_and_save(cfg, tiny_split(tiny_data), Accelerator(cpu=True))
    assert metrics["validation"]["mAP"] is not None
    card = (tmp_path / "README.md").read_text()
    assert ("averaged over known labels only (each attribute's mean, then the mean over the attributes: "
            "`--loss-average attributes`)") in card
    assert json.loads((tmp_path / "train_config.json").read_text())["loss_average"] == "attributes"
    # BCE: the default threshold rule, named in the card and in metrics.json
    assert metrics["threshold_rule"] == "half-f1"
    assert "threshold is half the best F1 it reached on the validation split" in card
    assert "stochastic depth" not in card  # --drop-path 0, the default


def test_the_card_says_how_the_thresholds_were_tuned():
    assert "half the best F1" in card.threshold_summary({"threshold_rule": "half-f1"})
    plain = "Thresholds were tuned per attribute to maximise F1 on the validation split."
    assert card.threshold_summary({"threshold_rule": "max-f1"}) == plain
    assert card.threshold_summary({}) == plain  # metrics.json of a run before the rule was recorded


def test_a_run_whose_anneal_reached_the_last_epoch_is_not_called_still_rising():
    """--early-stop-anneal can end in the last allowed epoch and make it the best: the plateau came first, so the card
    does not suggest more epochs; a run whose best epoch is simply its last one still gets the hint."""
    validation = {"f1_macro_tuned": None, "f1_macro_tuned_crossfit": None}
    metrics = {"validation": validation, "data": {"skipped_images": 0}, "pos_weight": {"a": 2.0}, "best_epoch": 30,
               "epochs_run": 30, "stopped_early": False}
    assert any("still rising" in note for note in card.run_notes(metrics, {"epochs": 30}))
    annealed = {**metrics, "stopped_early": True}
    assert not any("still rising" in note for note in card.run_notes(annealed, {"epochs": 30}))


def test_drop_path_trains_and_the_card_says_so(tiny_data, tmp_path):
    from accelerate import Accelerator

    from attrclf.engine import train_and_save

    from .conftest import tiny_config, tiny_split

    cfg = tiny_config(tiny_data, tmp_path, drop_path=0.2, epochs=1)
    train_and_save(cfg, tiny_split(tiny_data), Accelerator(cpu=True))
    card = (tmp_path / "README.md").read_text()
    assert "stochastic depth rising to 0.2 at the backbone's last block (--drop-path)" in card
    assert json.loads((tmp_path / "train_config.json").read_text())["drop_path"] == 0.2
    assert "drop_path" not in (tmp_path / "config.json").read_text()  # a training setting: inference never drops
