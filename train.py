"""Train an attrclf model: `accelerate launch train.py [--data DIR_OR_HUB_ID] [flags]` (see --help).

Wiring only: every step is an attrclf function.
"""

import sys

from accelerate import Accelerator

from attrclf.config import TrainConfig, parse_args
from attrclf.crossval import cross_validate
from attrclf.engine import load_training_data, train_and_save
from attrclf.errors import AttrclfError
from attrclf.hardware import configure_threads, resolve_mixed_precision
from attrclf.hub import check_can_push, push_model


def training_function(cfg: TrainConfig) -> dict:
    if cfg.push_to_hub:
        check_can_push(cfg.push_to_hub)  # no token or a bad id: say so now, not after training
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    configure_threads(cfg, accelerator)
    data = load_training_data(cfg, accelerator)
    accelerator.print(
        f"data: {data.source}: {len(data.train)} train / {len(data.validation)} validation images, "
        f"{len(data.label_names)} attributes ({data.split}); {len(data.skipped)} unreadable image(s) skipped"
    )
    for item in data.skipped[:10]:
        accelerator.print(f"  skipped {item['image']}: {item['reason']}")
    for message in data.warnings:
        accelerator.print(f"warning: {message}")
    if cfg.folds:
        return cross_validate(cfg, data, accelerator)
    metrics = train_and_save(cfg, data, accelerator)
    if cfg.push_to_hub and accelerator.is_main_process:
        url = push_model(cfg.output_dir, cfg.push_to_hub, private=cfg.hub_private)
        accelerator.print(f"pushed {cfg.output_dir}/ to {cfg.push_to_hub}: {url}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    try:
        training_function(parse_args(argv).resolve())
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
