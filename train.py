"""Train an attrclf model: `accelerate launch train.py [--data DIR_OR_HUB_ID] [flags]` (see --help).

Wiring only: every step is an attrclf function.
"""

import sys

from accelerate import Accelerator

from attrclf.engine import (
    TrainConfig,
    configure_threads,
    cross_validate,
    load_training_data,
    parse_args,
    train_and_save,
)
from attrclf.errors import AttrclfError


def training_function(cfg: TrainConfig) -> dict:
    accelerator = Accelerator()
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
    return train_and_save(cfg, data, accelerator)


def main(argv: list[str] | None = None) -> None:
    try:
        training_function(parse_args(argv).resolve())
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
