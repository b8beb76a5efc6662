"""The `attrclf` command (attrclf/cli.py): --help everywhere, dispatch to each module's main, one-line errors."""

import os
import subprocess
import sys

import pytest

import attrclf
from attrclf import cli

from .conftest import REPO

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"attrclf {attrclf.__version__}\n"


@pytest.mark.parametrize("command, module, prefix", [
    ("train", "attrclf.training", []), ("predict", "attrclf.predict", []), ("evaluate", "attrclf.evaluate", []),
    ("export", "attrclf.export", []), ("push", "attrclf.hub", ["push"]), ("push-space", "attrclf.hub", ["push-space"]),
    ("app", "attrclf.serving", []), ("demo", "attrclf.demo", []),
])
def test_each_command_runs_its_module_main(command, module, prefix, monkeypatch):
    calls = []

    class Module:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 7

    monkeypatch.setattr(cli, "import_module", lambda name: Module if name == module else None)
    assert cli.main([command, "x", "--flag"]) == 7
    assert calls == [[*prefix, "x", "--flag"]]


@pytest.mark.parametrize("argv, message", [
    ([], "error: no command given; choose one of train, predict, evaluate"),
    (["bogus"], "error: unknown command 'bogus'"),
    (["predict", "--model", "no/such/folder", "x.png"], "error: model 'no/such/folder' is neither a model folder"),
    (["evaluate", "--model", "nowhere", "--data", "x"], "error: model 'nowhere' is neither a model folder"),
    (["export", "nowhere", "out.onnx"], "error: model 'nowhere' is neither a model folder"),
    (["push", "nowhere", "user/x"], "error: 'nowhere' is not a folder"),
])
def test_bad_input_is_exit_2_and_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_missing_extra_names_the_pip_install(monkeypatch, capsys):
    def import_module(name):
        raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    monkeypatch.setattr(cli, "import_module", import_module)
    assert cli.main(["app"]) == 2
    assert "pip install 'attrclf[app]'" in capsys.readouterr().err


def test_demo_writes_the_dataset(tmp_path, capsys):
    assert cli.main(["demo", str(tmp_path / "demo"), "--num-images", "6", "--image-size", "16"]) == 0
    lines = (tmp_path / "demo" / "labels.txt").read_text().splitlines()
    assert lines[0].startswith("image outlined red") and len(lines) == 7
    assert len(list((tmp_path / "demo" / "images").iterdir())) == 6


@pytest.mark.slow
def test_accelerate_launch_m_attrclf_train(tmp_path):
    """`accelerate launch -m attrclf train`: the package's __main__ under accelerate's launcher; then a bad flag value
    through `python -m attrclf train` is one line and exit code 2."""
    env = {**os.environ, "ATTRCLF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "outputs"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-m", "attrclf", "train", *TINY,
                             "--demo-size", "80", "--epochs", "1", "--output-dir", str(out)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "attrclf", "train", "--data", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --data") and bad.stderr.count("\n") == 1, bad.stderr
