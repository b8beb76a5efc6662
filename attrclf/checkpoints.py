"""Checkpoints and resume: the whole training state after each epoch in OUTPUT/checkpoints/epoch_NNNN.

A checkpoint folder holds accelerate's `save_state` (model, optimizer, scaler, every process's RNG states), the best
epoch's weights (best_model.safetensors) and validation output (best_validation.safetensors: probs, targets, mask), the
moving average of the weights when the run keeps one (ema_model.safetensors, attrclf.ema), and
training_state.json: `RunState.to_dict()` plus "fingerprint" (the data), "world_size", "batch_size", "train_config"
(asdict(TrainConfig)) and "best" (`BestEpoch.summary()`).
"""

import json
import re
import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .config import LATEST, TrainConfig
from .errors import AttrclfError
from .fileio import atomic_folder
from .state import BestEpoch, RunState

CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/epoch_NNNN
STATE_FILE = "training_state.json"
BEST_WEIGHTS = "best_model.safetensors"
BEST_PREDICTIONS = "best_validation.safetensors"
EMA_WEIGHTS = "ema_model.safetensors"
# settings that may change on --resume without a warning: they do not change what the run computes
RESUME_FREE = {"resume", "output_dir", "keep_checkpoints", "num_workers", "cpu_threads", "epochs", "max_steps"}


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first; a temporary folder left by a kill mid-write is not one."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"epoch_\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The checkpoint --resume names: the latest in OUTPUT/checkpoints, or PATH (a checkpoint, or a folder of them)."""
    folder = checkpoint_root(output_dir) if resume == LATEST else Path(resume)
    if (folder / STATE_FILE).is_file():
        return folder
    if (folder / CHECKPOINTS).is_dir():
        folder = folder / CHECKPOINTS
    found = list_checkpoints(folder)
    if not found:
        raise AttrclfError(f"--resume: no checkpoint in '{folder}' (a run writes one there after each epoch); "
                           f"start without --resume, or pass --resume PATH to a checkpoint folder")
    return found[-1]


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run; a fresh run never overwrites an interrupted one's."""
    if cfg.resume:
        return find_checkpoint(cfg.resume, cfg.output_dir)
    existing = list_checkpoints(checkpoint_root(cfg.output_dir))
    if existing:
        raise AttrclfError(
            f"'{existing[-1].parent}' holds checkpoints of an interrupted run (latest: {existing[-1].name}): "
            f"pass --resume to continue it, or delete that folder or choose another --output-dir to start afresh"
        )
    return None


def save_checkpoint(accelerator: Accelerator, run: RunState, best: BestEpoch, *, fingerprint: str,
                    cfg: TrainConfig, ema: torch.nn.Module | None = None) -> Path:
    """The whole training state after an epoch, in OUTPUT/checkpoints/epoch_NNNN; the last --keep-checkpoints stay.

    Every process writes its part (its RNG states) into one temporary folder, which the main process renames when it
    is complete: a kill mid-write leaves the previous checkpoint the latest.
    """
    root = checkpoint_root(cfg.output_dir)
    final = root / f"epoch_{run.epoch:04d}"  # replaces an older run's epoch of that number (resumed from further back)
    main = accelerator.is_main_process
    with atomic_folder(final) if main else nullcontext() as temporary:
        folder = [str(temporary) if main else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(folder)  # the main process's temporary name, to every process
        accelerator.save_state(folder[0])
        if main:
            safetensors.torch.save_file(best.state, temporary / BEST_WEIGHTS)
            if ema is not None:
                safetensors.torch.save_file(contiguous_state(ema.module), temporary / EMA_WEIGHTS)
            safetensors.numpy.save_file({"probs": best.probs, "targets": best.targets,
                                         "mask": best.mask.astype(np.uint8)}, temporary / BEST_PREDICTIONS)
            saved = {**run.to_dict(), "fingerprint": fingerprint, "world_size": accelerator.num_processes,
                     "batch_size": cfg.batch_size, "train_config": asdict(cfg), "best": best.summary()}
            (temporary / STATE_FILE).write_text(json.dumps(saved))  # the folder is renamed in whole: no temp file
        accelerator.wait_for_everyone()  # every process's part is in before the folder is renamed
    if main:
        for old in list_checkpoints(root)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path, fingerprint: str, cfg: TrainConfig,
                    accelerator: Accelerator) -> tuple[RunState, BestEpoch]:
    """The loop's state and best epoch from a checkpoint, after checking that it comes from this data and layout."""
    saved = json.loads((path / STATE_FILE).read_text())
    if saved["fingerprint"] != fingerprint:
        raise AttrclfError(
            f"--resume: checkpoint '{path}' was trained on other data (label names, images, labels or split differ); "
            f"resume with the same --data / --label-columns / --val-fraction / --seed, or start afresh"
        )
    if (saved["world_size"], saved["batch_size"]) != (accelerator.num_processes, cfg.batch_size):
        raise AttrclfError(
            f"--resume: checkpoint '{path}' was written by {saved['world_size']} process(es) at --batch-size "
            f"{saved['batch_size']}; this run has {accelerator.num_processes} at {cfg.batch_size}. Resume with the "
            f"same number of processes and batch size (the step count and learning-rate schedule depend on both)"
        )
    changed = [k for k, v in asdict(cfg).items() if k not in RESUME_FREE and saved["train_config"].get(k) != v]
    if changed:
        accelerator.print(f"warning: resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
    predictions = safetensors.numpy.load_file(path / BEST_PREDICTIONS)
    best = BestEpoch(**saved["best"], state=safetensors.torch.load_file(path / BEST_WEIGHTS),
                     probs=predictions["probs"], targets=predictions["targets"], mask=predictions["mask"].astype(bool))
    return RunState.from_dict(saved), best


def contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors (safetensors stores no channels_last)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()}


def load_ema(path: Path, ema: torch.nn.Module | None) -> None:
    """Put a checkpoint's weight average back into `ema` (strict); a run without one has nothing to load."""
    if ema is None:
        return
    if not (path / EMA_WEIGHTS).is_file():
        raise AttrclfError(f"--resume: checkpoint '{path}' has no {EMA_WEIGHTS} (it was written with --ema-decay 0); "
                           f"resume with --ema-decay 0, or start afresh")
    ema.module.load_state_dict(safetensors.torch.load_file(path / EMA_WEIGHTS), strict=True)

