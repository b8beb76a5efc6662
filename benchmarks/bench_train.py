"""Training speed per stage, attrclf vs the seed recipe, in one process on the same emoji images.

    python -m benchmarks.bench_train [--backbone resnet18] [--limit-groups 300] [--steps 20] [--threads N]
    accelerate launch -m benchmarks.bench_train ...      # same, on what `accelerate config` set up (GPU: bf16 auto)

End to end means decoding, augmentation, the forward, the backward and the optimiser step: images / wall seconds of a
training pass over `--steps` batches (after one warm-up batch each); in stage 2 the two recipes alternate in rounds so
that load from other jobs on a shared machine falls on both alike. Stage 1 is the head-only stage (3 epochs in both
recipes, the seed's count; attrclf's default is now 1): the seed runs the frozen backbone on every augmented image in
every epoch and validates the whole model; attrclf runs the backbone once per training and validation image, then trains
and validates the head on the stored features. Stage 2 trains the head and the backbone on augmented images: attrclf's
default for a pretrained backbone, its last two stages (`--unfreeze-stages 2`); the seed's, its last stage only
(`--unfreeze-stages 1` gives attrclf the seed's share).
Random weights: speed does not depend on them. Time to the baseline's best validation mAP comes from bench_quality's
full runs.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from attrclf.config import TrainConfig
from attrclf.engine import build_model, evaluate, train_one_epoch
from attrclf.hardware import configure_threads, resolve_mixed_precision
from attrclf.headcache import CachedHeadStage
from attrclf.loader import make_loader
from attrclf.losses import build_loss
from attrclf.optim import make_optimizer
from attrclf.sources import prepare_data
from attrclf.state import RunState
from attrclf.transforms import eval_transform, train_transform

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


class SeedRunner:
    """The seed recipe's model, loaders and optimiser, driven stage by stage."""

    def __init__(self, cfg: seed_baseline.SeedConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        names, self.train_loader, self.val_loader, _, pos_weight = seed_baseline.make_loaders(cfg)  # no test list
        self.model = seed_baseline.SeedModel(cfg.backbone, len(names)).to(self.device)
        self.pos_weight = pos_weight.to(self.device)

    def set_stage(self, finetune: bool) -> None:
        self.model.freeze_backbone(unfreeze_last_stage=finetune)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=1e-4 if finetune else 2e-3)

    def train(self, steps: int) -> tuple[int, float]:
        row = seed_baseline.train_epoch(self.model, self.train_loader, self.optimizer, self.pos_weight, self.device,
                                        max_steps=steps)
        return row["images"], row["train_seconds"]

    def validate_seconds(self) -> float:
        start = time.perf_counter()
        seed_baseline.validate(self.model, self.val_loader, self.pos_weight, self.device)
        return time.perf_counter() - start


class AttrclfRunner:
    """attrclf's model, loaders and optimiser as `fit` builds them, driven stage by stage."""

    def __init__(self, cfg: TrainConfig, data, accelerator):
        self.cfg, self.data, self.accelerator = cfg, data, accelerator
        model = build_model(cfg, data.label_names)
        self.loss_fn = build_loss("bce", torch.ones(len(data.label_names))).to(accelerator.device)
        model.set_trainable(0)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        val_loader = make_loader(data.validation, eval_transform(model.config), cfg.batch_size, False,
                                 num_workers=cfg.num_workers, channels_last=cfg.channels_last)
        train_loader = make_loader(data.train, train_transform(model.config), cfg.batch_size, True,
                                   num_workers=cfg.num_workers, seed=cfg.seed, channels_last=cfg.channels_last)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self.state = RunState()

    def head_stage(self) -> list[float]:
        """Seconds of each head epoch (train + validate); the first includes the one backbone pass."""
        stage, seconds = CachedHeadStage(self.data, self.cfg), []
        for epoch in range(self.cfg.head_epochs):
            start = time.perf_counter()
            stage.run_epoch(self.model, self.optimizer, self.val_loader, self.loss_fn, accelerator=self.accelerator,
                            state=self.state, epoch=epoch)
            synchronize(self.accelerator)
            seconds.append(time.perf_counter() - start)
        self.accelerator.unwrap_model(self.model).set_trainable(self.cfg.unfreeze)
        return seconds

    def train(self, steps: int) -> tuple[int, float]:
        run = TrainConfig(**{**vars(self.cfg), "max_steps": steps})
        timed = RunState()  # its own step count: the schedule starts again, as the timed pass always did
        synchronize(self.accelerator)
        start = time.perf_counter()
        # the epoch index only labels the progress bar; the steps may stop at the end of the epoch (drop_last: full)
        train_one_epoch(self.model, self.train_loader, self.optimizer, self.loss_fn, accelerator=self.accelerator,
                        state=timed, cfg=run, epoch=self.cfg.head_epochs)
        synchronize(self.accelerator)
        return timed.step * self.cfg.batch_size * self.accelerator.num_processes, time.perf_counter() - start

    def validate_seconds(self) -> float:
        start = time.perf_counter()
        evaluate(self.model, self.val_loader, self.loss_fn, self.accelerator)
        return time.perf_counter() - start


def interleaved_rate(runners: dict, steps: dict, rounds: int) -> dict:
    """img/s of each runner over `rounds` alternating rounds (after one warm-up batch each): on a shared machine the
    other jobs' load falls on all runners alike."""
    totals = {name: [0, 0.0] for name in runners}
    for runner in runners.values():
        runner.train(1)
    for _ in range(rounds):
        for name, runner in runners.items():
            images, seconds = runner.train(steps[name])
            totals[name][0] += images
            totals[name][1] += seconds
    return {name: images / seconds for name, (images, seconds) in totals.items()}


def measure(cfg: TrainConfig, seed_cfg, data, accelerator, steps: int, rounds: int) -> tuple[dict, dict]:
    ours = AttrclfRunner(cfg, data, accelerator)
    head = ours.head_stage()
    attrclf = {"head_first_epoch_seconds": head[0], "head_later_epoch_seconds": min(head[1:] or head),
               "head_stage_seconds": sum(head), "head_images_per_second": len(data.train) * len(head) / sum(head)}
    seed = {}
    runners = {"attrclf": ours}
    if seed_cfg is not None:
        runner = SeedRunner(seed_cfg)
        runner.set_stage(finetune=False)
        seed_rate = interleaved_rate({"seed": runner}, {"seed": steps * cfg.batch_size // 16}, 1)["seed"]
        val_seconds = runner.validate_seconds()
        epoch = len(data.train) / seed_rate + val_seconds
        seed = {"head_images_per_second": len(data.train) / epoch, "head_train_images_per_second": seed_rate,
                "head_epoch_seconds": epoch, "head_stage_seconds": cfg.head_epochs * epoch, "val_seconds": val_seconds}
        runner.set_stage(finetune=True)
        runners["seed"] = runner
    per_round = max(1, steps // rounds)
    rates = interleaved_rate(runners, {"attrclf": per_round, "seed": per_round * cfg.batch_size // 16}, rounds)
    attrclf["finetune_images_per_second"] = rates["attrclf"]
    attrclf["gpu_busy_percent_after_finetune"] = gpu_busy_percent() if accelerator.device.type == "cuda" else None
    attrclf["val_seconds"] = ours.validate_seconds()
    if seed:
        seed["finetune_images_per_second"] = rates["seed"]
    return attrclf, seed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data-dir", type=Path, default=EMOJI)
    parser.add_argument("--limit-groups", type=int, default=300, help="base emoji to use (0: all 1911)")
    parser.add_argument("--steps", type=int, default=20, help="timed attrclf training batches per stage (the seed "
                        "gets as many images in batches of 16)")
    parser.add_argument("--rounds", type=int, default=4, help="stage 2 alternates attrclf and seed in this many rounds")
    parser.add_argument("--batch-size", type=int, default=32, help="attrclf's batch (the seed's is 16)")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--unfreeze-stages", default=None, help="attrclf's stage 2 (default: attrclf's for a "
                        "pretrained backbone, 2; the seed: 1)")
    parser.add_argument("--num-workers", type=int, default=None, help="both recipes (default: attrclf's choice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision))
    with tempfile.TemporaryDirectory() as workdir:
        labels = subset_labels(args.data_dir, Path(workdir) / "labels.txt", args.limit_groups or None)
        cfg = TrainConfig(data=str(args.data_dir), labels=str(labels), images=str(args.data_dir / "images"),
                          group_column=GROUP_COLUMN, backbone=args.backbone, pretrained=True, head_epochs=3,
                          image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers,
                          cpu_threads=args.threads, unfreeze_stages=args.unfreeze_stages,
                          mixed_precision=args.mixed_precision).resolve()
        cfg.pretrained = False  # speed only: random weights, but the pretrained recipe's stages
        configure_threads(cfg, accelerator)
        data = prepare_data(cfg.data, cfg.images, cfg.labels, group_column=GROUP_COLUMN,
                            val_fraction=cfg.val_fraction, seed=cfg.seed)
        val_list = Path(workdir) / "val.txt"
        val_list.write_text("\n".join(data.validation["image_name"]) + "\n")
        seed_cfg = None if args.skip_seed or accelerator.num_processes > 1 else seed_baseline.SeedConfig(
            data=str(args.data_dir), labels=str(labels), group_column=GROUP_COLUMN, val_list=str(val_list),
            backbone=args.backbone, image_size=args.image_size, num_workers=cfg.num_workers)
        ours, seed = measure(cfg, seed_cfg, data, accelerator, args.steps, args.rounds)
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
        [f"stage 2 end-to-end img/s (attrclf: --unfreeze-stages {cfg.unfreeze_stages}; seed: last stage)",
         ours["finetune_images_per_second"],
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
