"""Checkpoints and resume in one process: the last K kept, other data refused, --resume's forms, no overwrite."""

import pytest
import torch
from accelerate import Accelerator

from attrclf.checkpoints import check_optimizer_layout, list_checkpoints, read_checkpoint, resume_point
from attrclf.config import parse_args
from attrclf.engine import build_model, fit
from attrclf.errors import AttrclfError
from attrclf.splits import data_fingerprint

from .conftest import tiny_config, tiny_split


@pytest.mark.slow  # trains 3 epochs, then resumes
def test_checkpoints_keep_the_last_k_and_refuse_other_data(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path / "out", epochs=3, keep_checkpoints=2)
    data = tiny_split(tiny_data)
    accelerator = Accelerator()
    result = fit(build_model(cfg, data.label_names), data, cfg, accelerator)
    kept = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [p.name for p in kept] == ["epoch_0002", "epoch_0003"]

    resumed = fit(build_model(cfg, data.label_names), data, cfg, accelerator, resume_from=kept[-1])
    assert resumed.history == result.history and resumed.best.epoch == result.best.epoch  # nothing left to train
    assert all(torch.equal(resumed.best.state[k], v) for k, v in result.best.state.items())

    fewer = tiny_split(tiny_data, label_columns=["a", "b"])
    with pytest.raises(AttrclfError, match="trained on other data"):
        read_checkpoint(kept[-1], data_fingerprint(fewer), cfg, accelerator)
    other_split = tiny_split(tiny_data, seed=7)
    with pytest.raises(AttrclfError, match="trained on other data"):
        read_checkpoint(kept[-1], data_fingerprint(other_split), cfg, accelerator)
    with pytest.raises(AttrclfError, match="batch-size 8"):
        read_checkpoint(kept[-1], data_fingerprint(data), tiny_config(tiny_data, tmp_path, batch_size=4), accelerator)


def test_resume_flags_and_a_fresh_run_never_overwrites_an_interrupted_one(tmp_path, tiny_data):
    assert parse_args(["--resume"]).resume == "latest"
    assert parse_args(["--resume", "ck/epoch_0002"]).resume == "ck/epoch_0002"
    assert parse_args([]).resume is None and parse_args([]).keep_checkpoints == 2
    with pytest.raises(AttrclfError, match="no checkpoint in"):
        resume_point(tiny_config(tiny_data, tmp_path / "out", resume="latest"))
    checkpoint = tmp_path / "out" / "checkpoints" / "epoch_0001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    (tmp_path / "out" / "checkpoints" / ".tmp-epoch_0002").mkdir()  # an unfinished write is not a checkpoint
    with pytest.raises(AttrclfError, match=r"interrupted run \(latest: epoch_0001\): pass --resume"):
        resume_point(tiny_config(tiny_data, tmp_path / "out"))
    assert resume_point(tiny_config(tiny_data, tmp_path / "out", resume="latest")) == checkpoint
    assert (checkpoint / "training_state.json").read_text() == "{}"


def test_a_checkpoint_with_another_optimizer_layout_is_refused_by_name(tmp_path):
    cfg = parse_args(["--data", "x", "--backbone-weights", "w"]).resolve()  # today's default: the last 2 stages
    older = {"unfreeze_stages": "1"}  # written before the default changed, and before --lr-layer-decay existed
    with pytest.raises(AttrclfError) as error:
        check_optimizer_layout(tmp_path / "epoch_0002", older, cfg)
    assert str(error.value) == (
        f"--resume: checkpoint '{tmp_path / 'epoch_0002'}' was trained with --unfreeze-stages 1; this run asks for 2 "
        f"(a default may have changed since), so its optimizer holds other parameters. Add --unfreeze-stages 1 to the "
        f"command to resume, or start afresh")
    check_optimizer_layout(tmp_path, {"unfreeze_stages": "2"}, cfg)  # a missing lr_layer_decay is its default, 1
    with pytest.raises(AttrclfError, match="--lr-layer-decay 0.5"):
        check_optimizer_layout(tmp_path, {"unfreeze_stages": "2", "lr_layer_decay": 0.5}, cfg)
    # a run begun before the one-Linear head became the default (its head held a 128-wide hidden layer)
    with pytest.raises(AttrclfError, match=r"trained with --head-hidden 128; this run asks for 0 .* Add --head-hidden "
                                           r"128 to the command to resume"):
        check_optimizer_layout(tmp_path, {"unfreeze_stages": "2", "head_hidden": 128}, cfg)
