"""Train an attrclf model: `accelerate launch train.py [--data DIR_OR_HUB_ID] [flags]` (see --help).

Wiring only: every step is an attrclf function.
"""

import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from attrclf.engine import (
    TrainConfig,
    build_model,
    configure_threads,
    finalize,
    fit,
    load_training_data,
    parse_args,
    resolve_mixed_precision,
    summary_table,
    write_outputs,
)
from attrclf.errors import AttrclfError


def training_function(cfg: TrainConfig) -> dict:
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    set_seed(cfg.seed)
    threads = configure_threads(cfg, accelerator)
    data = load_training_data(cfg, accelerator)
    accelerator.print(
        f"data: {data.source}: {len(data.train)} train / {len(data.validation)} validation images, "
        f"{len(data.label_names)} attributes ({data.split}); {len(data.skipped)} unreadable image(s) skipped"
    )
    for item in data.skipped[:10]:
        accelerator.print(f"  skipped {item['image']}: {item['reason']}")
    for message in data.warnings:
        accelerator.print(f"warning: {message}")
    model = build_model(cfg, data.label_names)
    accelerator.print(
        f"model: {cfg.backbone} ({'pretrained' if cfg.pretrained else 'from scratch'}), input "
        f"{model.config.input_size[1]}px; stages: head {cfg.head_epochs} epoch(s), then unfreeze "
        f"{cfg.unfreeze_stages}; device {accelerator.device}, {accelerator.num_processes} process(es), "
        f"{threads} thread(s) each"
    )
    result = fit(model, data, cfg, accelerator)
    model = accelerator.unwrap_model(model)
    metrics = finalize(model, result, data, cfg)
    if accelerator.is_main_process:
        written = write_outputs(model, metrics, result, cfg, Path(cfg.output_dir))
        accelerator.print(summary_table(metrics))
        accelerator.print(f"saved to {cfg.output_dir}/: {', '.join(written)}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> None:
    try:
        training_function(parse_args(argv).resolve())
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
