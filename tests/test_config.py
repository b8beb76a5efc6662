"""TrainConfig and its command line: automatic defaults, checks, and `--config FILE` (YAML or JSON) under the flags."""

import json
from dataclasses import asdict

import pytest

from attrclf.config import TrainConfig, build_parser, parse_args
from attrclf.errors import AttrclfError


def test_automatic_defaults_for_the_demo_and_for_data():
    demo = TrainConfig().resolve()
    assert (demo.image_size, demo.epochs, demo.batch_size, demo.lr) == (48, 10, 64, 3e-3)
    assert (demo.pretrained, demo.head_epochs, demo.unfreeze_stages, demo.lr_finetune) == (False, 0, "all", 3e-3)
    data = TrainConfig(data="some/folder/x", backbone_weights="w.safetensors").resolve()
    assert (data.image_size, data.epochs, data.batch_size, data.lr) == (None, 30, 32, 2e-3)
    assert (data.pretrained, data.head_epochs, data.unfreeze_stages, data.lr_finetune) == (True, 1, "2", 3e-4)
    assert data.resolve() == data  # resolving twice decides nothing new


@pytest.mark.parametrize("flags, rule", [
    ([], "half-f1"),                                       # BCE: calibrated once pos_weight is taken out
    (["--loss", "asl"], "max-f1"),                         # ASL and focal reshape the probabilities
    (["--loss", "focal"], "max-f1"),
    (["--balanced-sampler"], "max-f1"),                    # resampling moves them too
    (["--loss", "asl", "--threshold-rule", "half-f1"], "half-f1"),  # a rule that is asked for is kept
    (["--threshold-rule", "max-f1"], "max-f1"),
])
def test_the_threshold_rule_auto_picks_half_f1_only_where_the_probabilities_are_calibrated(flags, rule):
    assert parse_args(flags).resolve().tuning_rule == rule


@pytest.mark.parametrize("flags, message", [
    (["--unfreeze-stages", "last"], "--unfreeze-stages must be a number or 'all' (got 'last')"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--folds", "1"], "--folds must be at least 2 (got 1)"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be 0 (no checkpoints) or more"),
])
def test_bad_settings_are_named(flags, message):
    with pytest.raises(AttrclfError) as error:
        parse_args(flags).resolve()
    assert str(error.value) == message


def saved_train_config(tmp_path, **changes):
    """train_config.json as write_outputs writes it: asdict of the resolved TrainConfig, indent 2."""
    cfg = TrainConfig(data=str(tmp_path), label_columns=["a", "b"], lr=5e-4, hflip=0.0, balanced_sampler=True,
                      focal_alpha=0.25, **changes).resolve()
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(asdict(cfg), indent=2))
    return cfg, path


def test_config_round_trip_repeats_a_run(tmp_path):
    cfg, path = saved_train_config(tmp_path)
    assert parse_args(["--config", str(path)]) == cfg  # every field, resolved ones included
    assert parse_args(["--config", str(path)]).resolve() == cfg
    demo = TrainConfig().resolve()
    (tmp_path / "demo.json").write_text(json.dumps(asdict(demo)))
    assert parse_args(["--config", str(tmp_path / "demo.json")]).resolve() == demo


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    cfg, path = saved_train_config(tmp_path)
    got = parse_args(["--lr", "0.1", "--config", str(path), "--no-balanced-sampler", "--label-columns", "c"])
    assert (got.lr, got.balanced_sampler, got.label_columns) == (0.1, False, ["c"])
    assert got.hflip == 0.0 and got.focal_alpha == 0.25  # the rest from the file
    assert parse_args(["--config", str(path), "--resume"]).resume == "latest"


def test_a_resumed_runs_config_does_not_resume_again(tmp_path, capsys):
    cfg, path = saved_train_config(tmp_path, resume="latest")
    got = parse_args(["--config", str(path)])
    assert got.resume is None and got == TrainConfig(**{**asdict(cfg), "resume": None})
    assert "'resume' is taken from the command line only" in capsys.readouterr().err


def test_yaml_config_with_flag_style_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# a hand-written run\nbatch-size: 16\nlr: 1.0e-3\nlabel_columns: [red, big]\npretrained: false\n"
                    "loss: focal\nfocal_alpha: null\n")
    got = parse_args(["--config", str(path)])
    assert (got.batch_size, got.lr, got.label_columns, got.pretrained, got.loss) == (16, 1e-3, ["red", "big"], False,
                                                                                    "focal")
    assert got.focal_alpha is None and got.epochs is None  # null and absent: the defaults
    assert parse_args(["--config", str(path)]) == parse_args(["--batch-size", "16", "--lr", "1e-3", "--label-columns",
                                                              "red", "big", "--no-pretrained", "--loss", "focal"])


def test_unknown_keys_are_one_clear_error(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 0.01, "learning_rate": 0.01, "epoch": 3}))
    with pytest.raises(AttrclfError) as error:
        parse_args(["--config", str(path)])
    assert str(error.value) == (
        f"--config: '{path}' has unknown setting(s) epoch, learning_rate; the settings are TrainConfig's fields, "
        f"named like the flags (batch_size or batch-size for --batch-size)")


@pytest.mark.parametrize("text, flag_error", [
    ('{"lr": "fast"}', "argument --lr: invalid float value: 'fast'"),
    ('{"epochs": 2.5}', "argument --epochs: invalid int value: '2.5'"),
    ('{"loss": "hinge"}', "argument --loss: invalid choice: 'hinge' (choose from 'asl', 'bce', 'focal')"),
    ('{"pretrained": "yes"}', "argument --pretrained/--no-pretrained: ignored explicit argument 'yes'"),
])
def test_a_bad_value_in_the_file_gets_the_flags_error_and_the_files_name(tmp_path, capsys, text, flag_error):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(AttrclfError) as error:
        parse_args(["--config", str(path)])
    assert str(error.value) == f"--config '{path}': {flag_error}"
    flag, value = next(iter(json.loads(text).items()))
    with pytest.raises(SystemExit):  # the same value as a flag: argparse's error, the same words
        build_parser().parse_args([f"--{flag}={value}"])
    assert f"error: {flag_error}" in capsys.readouterr().err


def test_unreadable_or_malformed_config_files(tmp_path):
    with pytest.raises(AttrclfError, match="--config: cannot read '.*missing.yaml'"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.json").write_text("{lr: 1")
    with pytest.raises(AttrclfError, match="is not valid JSON"):
        parse_args(["--config", str(tmp_path / "bad.json")])
    (tmp_path / "list.yaml").write_text("- lr\n- 1\n")
    with pytest.raises(AttrclfError, match="must hold a mapping of settings"):
        parse_args(["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "nested.yaml").write_text("data: {path: x}\n")
    with pytest.raises(AttrclfError, match="--data takes one value"):
        parse_args(["--config", str(tmp_path / "nested.yaml")])


@pytest.mark.parametrize("value, shown", [(-1, "-1"), (float("nan"), "nan")])
def test_a_negative_or_nan_clip_grad_is_one_clear_error(value, shown):
    from attrclf.config import TrainConfig

    with pytest.raises(AttrclfError, match=rf"--clip-grad must be >= 0, 0 = off \(got {shown}\)"):
        TrainConfig(data="d", clip_grad=value).resolve()


@pytest.mark.parametrize("value, shown", [(0.0, "0"), (0.5, "0.5"), (-3.0, "-3"), (float("nan"), "nan")])
def test_a_pos_weight_cap_below_one_or_nan_is_one_clear_error(value, shown):
    """Below 1 the clamp [1/cap, cap] would cross (0 divided by zero); nan would train with every weight nan."""
    message = rf"--pos-weight-cap must be >= 1, 1 = no positive weighting \(got {shown}\)"
    with pytest.raises(AttrclfError, match=message):
        TrainConfig(data="d", pos_weight_cap=value).resolve()


@pytest.mark.parametrize("value, shown", [(-0.1, "-0.1"), (1.0, "1"), (float("nan"), "nan")])
def test_a_drop_path_outside_0_1_is_one_clear_error(value, shown):
    from attrclf.config import TrainConfig

    with pytest.raises(AttrclfError, match=rf"--drop-path must be in \[0, 1\), 0 = off \(got {shown}\)"):
        TrainConfig(data="d", drop_path=value).resolve()


def test_head_flags_the_chosen_head_does_not_read_are_named_in_a_warning():
    assert parse_args([]).unused_flags() == []
    assert parse_args(["--head-hidden", "64", "--hidden-dropout", "0.1"]).unused_flags() == []
    assert parse_args(["--hidden-dropout", "0.1"]).unused_flags() == [
        "--hidden-dropout 0.1 is unused: it acts on the MLP head's hidden layer, which the default head (one Linear) "
        "does not have; add --head-hidden N for one"]
    assert parse_args(["--query-layers", "2"]).unused_flags() == [
        "--query-layers 2 is unused: it sizes --head query, and this run trains --head mlp"]
    assert parse_args(["--head", "query", "--head-hidden", "64", "--query-dim", "64"]).unused_flags() == [
        "--head-hidden 64 is unused: it belongs to --head mlp, and this run trains --head query"]


@pytest.mark.parametrize("args, warnings", [
    (["--fixmatch-threshold", "0.9", "--no-fixmatch-negatives"], [  # --no-... is the default: no warning for it
        "--fixmatch-threshold 0.9 is unused: it tunes --na-policy fixmatch, and this run uses --na-policy ignore"]),
    (["--na-policy", "pseudo", "--fixmatch-negatives", "--pseudo-weight", "0.3"], [
        "--fixmatch-negatives is unused: it tunes --na-policy fixmatch, and this run uses --na-policy pseudo"]),
    (["--na-policy", "selective", "--teacher-weight", "0.2", "--selective-weight", "0.2"], [
        "--teacher-weight 0.2 is unused: it tunes --na-policy teacher, and this run uses --na-policy selective"]),
    (["--asl-gamma-neg", "2", "--focal-alpha", "0.25"], [
        "--asl-gamma-neg 2 is unused: it tunes --loss asl, and this run uses --loss bce",
        "--focal-alpha 0.25 is unused: it tunes --loss focal, and this run uses --loss bce"]),
    (["--loss", "focal", "--focal-gamma", "1"], []),
    (["--crop-scale", "0.3"], [
        "--crop-scale 0.3 is unused: it sizes the random crops of --geometry crop, and this run uses --geometry "
        "whole"]),
    (["--geometry", "crop", "--crop-scale", "0.3"], []),
    (["--hub-private"], [
        "--hub-private is unused: it applies to the repo that --push-to-hub creates, and this run pushes nothing"]),
    (["--hub-private", "--push-to-hub", "me/attrclf"], []),
    (["--data", "some/folder", "--eval-every", "50"], [
        "--eval-every 50 is unused: it applies to streamed data (--streaming, or --data naming .tar / .parquet "
        "shards)"]),
    (["--data", "shards/*.tar", "--eval-every", "50"], []),
])
def test_flags_that_tune_another_mode_than_the_runs_are_named_in_a_warning(args, warnings):
    assert parse_args(args).unused_flags() == warnings
