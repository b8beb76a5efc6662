"""The `attrclf` command: one subcommand per task, each handed to its module's `main(argv)`.

    attrclf train|predict|evaluate|export|push|push-space|app|demo [flags]     (`attrclf COMMAND --help`)

A module is imported only when its subcommand runs, so `attrclf predict --help` loads neither the training stack
(accelerate, datasets) nor the app (gradio). `accelerate launch -m attrclf train` runs training on several processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import import_module

from . import __version__
from .errors import AttrclfError, run_cli

EXTRAS = {"gradio": "app", "onnx": "export", "onnxscript": "export", "onnxruntime": "export"}  # pyproject.toml


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose `main(argv)` runs it, words put before the user's flags, and a summary."""

    module: str
    summary: str
    prefix: tuple[str, ...] = ()

    def run(self, argv: list[str]) -> int:
        try:
            return import_module(self.module).main([*self.prefix, *argv]) or 0
        except ModuleNotFoundError as e:  # an optional dependency: say which extra brings it
            if e.name not in EXTRAS:
                raise
            raise AttrclfError(f"this command needs {e.name}, which is not installed: "
                               f"pip install 'attrclf[{EXTRAS[e.name]}]'") from e


COMMANDS = {
    "train": Command("attrclf.training", "train a model (the flags of train.py; `accelerate launch -m attrclf train` "
                                         "for several processes)"),
    "predict": Command("attrclf.predict", "predict the attributes of images"),
    "evaluate": Command("attrclf.evaluate", "score a model on a labelled test set (AP, F1, precision, recall)"),
    "export": Command("attrclf.export", "export a model to ONNX, checked against PyTorch"),
    "push": Command("attrclf.hub", "push a training output folder to a Hub model repo", ("push",)),
    "push-space": Command("attrclf.hub", "push the Gradio Space that serves a model", ("push-space",)),
    "app": Command("attrclf.serving", "serve a model in the Gradio web app"),
    "demo": Command("attrclf.demo", "write the demo dataset (labels.txt + images/) to a folder"),
    "shard": Command("attrclf.shards", "write a labelled dataset as WebDataset tar or Parquet shards (for streaming)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: attrclf COMMAND [flags]   (attrclf {__version__}; `attrclf COMMAND --help` for its flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] == "--version":
        print(f"attrclf {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command '{argv[0]}'" if argv else "no command given"
        raise AttrclfError(f"{given}; choose one of {', '.join(COMMANDS)} (attrclf --help)")
    return COMMANDS[argv[0]].run(argv[1:])


def main(argv: list[str] | None = None) -> int:
    """The console script: `attrclf COMMAND ...` (argv None: the process's own arguments)."""
    return run_cli(_dispatch, sys.argv[1:] if argv is None else list(argv))
