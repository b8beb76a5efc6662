"""Training speed per stage, attrclf vs the seed recipe, in one process on the same emoji images.

    python -m benchmarks.bench_train [--backbone resnet18] [--limit-groups 300] [--steps 20] [--threads N]
    accelerate launch -m benchmarks.bench_train ...      # same, on what `accelerate config` set up (GPU: bf16 auto)

End to end means decoding, augmentation, the forward, the backward and the optimiser step: images / wall seconds of a
training pass over `--steps` batches (after one warm-up batch each). Stage 1 is the head-only stage (3 epochs in both
recipes): the seed runs the frozen backbone on every augmented image in every epoch and validates the whole model;
attrclf runs the backbone once per training and validation image, then trains and validates the head on the stored
features. Stage 2 trains the head and the last backbone stage on augmented images in both. Random weights: speed does
not depend on them. Time to the baseline's best validation mAP comes from bench_quality's full runs.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from attrclf.data import eval_transform, make_loader, prepare_data, train_transform
from attrclf.engine import (
    CachedHeadStage,
    TrainConfig,
    build_model,
    configure_threads,
    evaluate,
    make_optimizer,
    resolve_mixed_precision,
    train_one_epoch,
)
from attrclf.losses import build_loss

from . import seed_baseline
from .common import EMOJI, GROUP_COLUMN, subset_labels, table, write_result


def synchronize(accelerator):
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()


def gpu_busy_percent() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except (ImportError, ModuleNotFoundError, RuntimeError, ValueError):  # pynvml missing: not measured
        return None


def seed_stages(cfg: seed_baseline.SeedConfig, steps: int, head_epochs: int) -> dict:
    """The seed's head epoch (train + validate) and its stage-2 training throughput."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names, train_loader, val_loader, pos_weight = seed_baseline.make_loaders(cfg)
    model = seed_baseline.SeedModel(cfg.backbone, len(names)).to(device)
    pos_weight = pos_weight.to(device)
    out = {}
    for stage, unfreeze in (("head", False), ("finetune", True)):
        model.freeze_backbone(unfreeze_last_stage=unfreeze)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        seed_baseline.train_epoch(model, train_loader, optimizer, pos_weight, device, max_steps=1)  # warm-up
        row = seed_baseline.train_epoch(model, train_loader, optimizer, pos_weight, device, max_steps=steps)
        out[f"{stage}_images_per_second"] = row["images"] / row["train_seconds"]
        if stage == "head":
            start = time.perf_counter()
            seed_baseline.validate(model, val_loader, pos_weight, device)
            val_seconds = time.perf_counter() - start
            epoch = len(train_loader.dataset) / out["head_images_per_second"] + val_seconds
            out.update(head_epoch_seconds=epoch, head_stage_seconds=head_epochs * epoch, val_seconds=val_seconds)
    return out


def attrclf_stages(cfg: TrainConfig, data, accelerator, steps: int) -> dict:
    """attrclf's head stage (features once, then head epochs) and its stage-2 training throughput."""
    model = build_model(cfg, data.label_names)
    loss_fn = build_loss("bce", torch.ones(len(data.label_names))).to(accelerator.device)
    model.set_trainable(0)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    val_loader = make_loader(data.validation, eval_transform(model.config), cfg.batch_size, False, cfg.num_workers,
                             channels_last=cfg.channels_last)
    train_loader = make_loader(data.train, train_transform(model.config), cfg.batch_size, True, cfg.num_workers,
                               cfg.seed, channels_last=cfg.channels_last)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    state = {"step": 0, "history": {"iterations": {"step": [], "epoch": [], "loss": []}}}
    head_stage, epochs = CachedHeadStage(data, cfg, val_loader), []
    for epoch in range(cfg.head_epochs):
        start = time.perf_counter()
        head_stage.run_epoch(model, optimizer, loss_fn, accelerator, state, epoch)
        synchronize(accelerator)
        epochs.append(time.perf_counter() - start)
    out = {"head_first_epoch_seconds": epochs[0], "head_later_epoch_seconds": min(epochs[1:] or epochs),
           "head_stage_seconds": sum(epochs)}
    out["head_images_per_second"] = len(data.train) * cfg.head_epochs / sum(epochs)
    accelerator.unwrap_model(model).set_trainable(cfg.unfreeze)
    run = TrainConfig(**{**vars(cfg), "max_steps": 1})
    train_one_epoch(model, train_loader, optimizer, loss_fn, accelerator, {**state, "step": 0}, run, 0)  # warm-up
    run.max_steps = steps
    synchronize(accelerator)
    start = time.perf_counter()
    train_one_epoch(model, train_loader, optimizer, loss_fn, accelerator, {**state, "step": 0}, run, 0)
    synchronize(accelerator)
    out["finetune_images_per_second"] = steps * cfg.batch_size * accelerator.num_processes / (
        time.perf_counter() - start)
    out["gpu_busy_percent_after_finetune"] = gpu_busy_percent() if accelerator.device.type == "cuda" else None
    start = time.perf_counter()
    evaluate(model, val_loader, loss_fn, accelerator)
    out["val_seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data-dir", type=Path, default=EMOJI)
    parser.add_argument("--limit-groups", type=int, default=300, help="base emoji to use (0: all 1911)")
    parser.add_argument("--steps", type=int, default=20, help="timed training batches per stage")
    parser.add_argument("--batch-size", type=int, default=32, help="attrclf's batch (the seed's is 16)")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--num-workers", type=int, default=None, help="both recipes (default: attrclf's choice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision))
    with tempfile.TemporaryDirectory() as workdir:
        labels = subset_labels(args.data_dir, Path(workdir) / "labels.txt", args.limit_groups or None)
        cfg = TrainConfig(data=str(args.data_dir), labels=str(labels), images=str(args.data_dir / "images"),
                          group_column=GROUP_COLUMN, backbone=args.backbone, pretrained=True, image_size=args.image_size,
                          batch_size=args.batch_size, num_workers=args.num_workers, cpu_threads=args.threads,
                          mixed_precision=args.mixed_precision).resolve()
        cfg.pretrained = False  # speed only: random weights, but the pretrained recipe's stages
        configure_threads(cfg, accelerator)
        data = prepare_data(cfg.data, cfg.images, cfg.labels, None, GROUP_COLUMN, cfg.val_fraction, cfg.seed)
        val_list = Path(workdir) / "val.txt"
        val_list.write_text("\n".join(data.validation["image_name"]) + "\n")
        ours = attrclf_stages(cfg, data, accelerator, args.steps)
        seed = {} if args.skip_seed or not accelerator.is_main_process else seed_stages(seed_baseline.SeedConfig(
            data=str(args.data_dir), labels=str(labels), group_column=GROUP_COLUMN, val_list=str(val_list),
            backbone=args.backbone, image_size=args.image_size, num_workers=cfg.num_workers), args.steps,
            cfg.head_epochs)
    if not accelerator.is_main_process:
        return
    report(args, cfg, accelerator, data, ours, seed)


def report(args, cfg, accelerator, data, ours, seed) -> None:
    def ratio(a, b):
        return f"{a / b:.1f}x" if a and b else "n/a"

    rows = [
        ["stage 1 (head) end-to-end img/s, 3 epochs", ours["head_images_per_second"],
         seed.get("head_images_per_second"), ratio(ours["head_images_per_second"], seed.get("head_images_per_second"))],
        ["stage 1 epoch seconds (first; later)", (f"{ours['head_first_epoch_seconds']:.1f}; "
         f"{ours['head_later_epoch_seconds']:.2f}"), seed.get("head_epoch_seconds"),
         ratio(seed.get("head_epoch_seconds"), ours["head_later_epoch_seconds"])],
        ["stage 1 total seconds (train + validate)", ours["head_stage_seconds"], seed.get("head_stage_seconds"),
         ratio(seed.get("head_stage_seconds"), ours["head_stage_seconds"])],
        ["stage 2 (last stage + head) end-to-end img/s", ours["finetune_images_per_second"],
         seed.get("finetune_images_per_second"),
         ratio(ours["finetune_images_per_second"], seed.get("finetune_images_per_second"))],
    ]
    print(f"{args.backbone}@{args.image_size}, {len(data.train)} train / {len(data.validation)} validation images, "
          f"device {accelerator.device} x{accelerator.num_processes}, mixed precision "
          f"{accelerator.mixed_precision}, {torch.get_num_threads()} threads, {cfg.num_workers} loader workers")
    print(table(rows, ["measure", "attrclf", "seed recipe", "attrclf gain"]))
    if ours.get("gpu_busy_percent_after_finetune") is not None:
        print(f"GPU busy: {ours['gpu_busy_percent_after_finetune']:.0f}%")
    path = write_result(f"train_{args.backbone}_{accelerator.device.type}", {
        "backbone": args.backbone, "image_size": args.image_size, "train_images": len(data.train),
        "validation_images": len(data.validation), "steps": args.steps, "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers, "mixed_precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes, "attrclf": ours, "seed": seed}, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
