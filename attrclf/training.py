"""Training as a command: check the push, start Accelerate, load the data, train (or cross-validate), push.

`attrclf train`, `python train.py`, `accelerate launch train.py` and `accelerate launch -m attrclf train` all run
`main(argv)`; the flags are TrainConfig's (`attrclf train --help`).
"""

from __future__ import annotations

import sys

from accelerate import Accelerator

from . import tracking
from .augment import mixing_warnings
from .config import TrainConfig, parse_args
from .crossval import cross_validate
from .engine import load_training_data, train_and_save
from .errors import run_cli
from .hardware import configure_threads, resolve_mixed_precision
from .hub import check_can_push, push_model
from .outputs import check_writable
from .preemption import stop_on_signals
from .streaming import StreamData


def training_function(cfg: TrainConfig) -> dict:
    """Train one model (or cfg.folds of them) and push it when asked; returns its metrics.json content."""
    check_writable(cfg.output_dir)  # a file, read-only, /proc: say so before loading anything
    if cfg.push_to_hub:
        check_can_push(cfg.push_to_hub)  # no token or a bad id: say so now, not after training
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                              **tracking.accelerator_options(cfg))
    configure_threads(cfg, accelerator)
    tracking.start(accelerator, cfg)  # --report-to: the run's settings to the trackers
    data = load_training_data(cfg, accelerator)
    accelerator.print(
        f"data: {data.source}: {len(data.train)} train / {len(data.validation)} validation images, "
        f"{len(data.label_names)} attributes ({data.split}); {len(data.skipped)} unreadable image(s) skipped"
    )
    for item in data.skipped[:10]:
        accelerator.print(f"  skipped {item['image']}: {item['reason']}")
    mixing = (cfg.mixup or cfg.cutmix) and not isinstance(data, StreamData)  # a stream holds no label list
    labels = data.train["labels"] if mixing else []  # read only when mixing can need it
    for message in data.warnings + cfg.unused_flags() + mixing_warnings(cfg.mixup, cfg.cutmix, labels, cfg.na_policy):
        accelerator.print(f"warning: {message}")
    if cfg.folds:
        metrics = cross_validate(cfg, data, accelerator)
        accelerator.end_training()
        return metrics
    metrics = train_and_save(cfg, data, accelerator)
    accelerator.end_training()  # closes the trackers (a no-op without --report-to)
    if cfg.push_to_hub and accelerator.is_main_process:
        url = push_model(cfg.output_dir, cfg.push_to_hub, private=cfg.hub_private)
        accelerator.print(f"pushed {cfg.output_dir}/ to {cfg.push_to_hub}: {url}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and train; an AttrclfError propagates (run_cli turns it into one line and exit code 2)."""
    cfg = parse_args(argv).resolve()
    with stop_on_signals(cfg.output_dir):  # SIGTERM / SIGINT: stop at a step boundary with a checkpoint
        training_function(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
