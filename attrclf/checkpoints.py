"""Checkpoints and resume: the whole training state after each epoch in OUTPUT/checkpoints/epoch_NNNN, and at the step
a stop signal ended training in OUTPUT/checkpoints/epoch_NNNN_step_SSSSSS (NNNN epochs done, SSSSSS steps done).

A checkpoint folder holds accelerate's `save_state` (model, optimizer, scaler, every process's RNG states), the best
epoch's weights (best_model.safetensors) and validation output (best_validation.safetensors: probs, targets, mask), the
moving average of the weights when the run keeps one (ema_model.safetensors, attrclf.ema), and
training_state.json: `RunState.to_dict()` plus "fingerprint" (the data), "world_size", "batch_size", "train_config"
(asdict(TrainConfig)) and "best" (`BestEpoch.summary()`, null before the first validation). A mid-epoch one also holds
replay_rng_<process>.json, each process's random state from just before the loader fetched the last trained batch: on
resume the epoch's first batches are drawn again but not trained (`Replay`), so the run continues exactly.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
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
from .outputs import writing
from .state import BestEpoch, RunState

CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/epoch_NNNN
STATE_FILE = "training_state.json"
BEST_WEIGHTS = "best_model.safetensors"
BEST_PREDICTIONS = "best_validation.safetensors"
EMA_WEIGHTS = "ema_model.safetensors"
REPLAY_RNG = "replay_rng_{}.json"  # per process
CHECKPOINT_NAME = re.compile(r"epoch_(\d+)(?:_step_(\d+))?")
# settings that may change on --resume without a warning: they do not change what the run computes
RESUME_FREE = {"resume", "output_dir", "keep_checkpoints", "num_workers", "cpu_threads", "epochs", "max_steps"}
# settings that decide the optimizer's parameter groups (attrclf.optim.make_optimizer) and the parameters in them (the
# backbone and the head's shape): a checkpoint's state loads only into the same layout
OPTIMIZER_LAYOUT = ("unfreeze_stages", "lr_layer_decay", "backbone", "head", "head_hidden", "query_dim", "query_heads",
                    "query_layers")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first; a temporary folder left by a kill mid-write is not one."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_order)


def checkpoint_order(path: Path) -> tuple[int, int]:
    """(epochs done, steps done) from the name; an epoch's own checkpoint comes before the ones written inside the
    next epoch."""
    epochs, steps = CHECKPOINT_NAME.fullmatch(path.name).groups()
    return int(epochs), int(steps or 0)


def checkpoint_name(run: RunState) -> str:
    return f"epoch_{run.epoch:04d}" + (f"_step_{run.step:06d}" if run.steps_into_epoch() else "")


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


def save_checkpoint(accelerator: Accelerator, run: RunState, best: BestEpoch | None, *, fingerprint: str,
                    cfg: TrainConfig, ema: torch.nn.Module | None = None,
                    before_fetch: RandomState | None = None) -> Path:
    """The whole training state in OUTPUT/checkpoints/epoch_NNNN (after an epoch) or epoch_NNNN_step_SSSSSS (inside
    one, with `before_fetch`: see `Replay`); the last --keep-checkpoints stay.

    Every process writes its part (its RNG states) into one temporary folder, which the main process renames when it
    is complete: a kill mid-write leaves the previous checkpoint the latest.
    """
    root = checkpoint_root(cfg.output_dir)
    final = root / checkpoint_name(run)  # replaces an older run's checkpoint of that name (resumed from further back)
    main = accelerator.is_main_process
    with writing(f"checkpoint {final.name}", root), atomic_folder(final) if main else nullcontext() as temporary:
        folder = [str(temporary) if main else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(folder)  # the main process's temporary name, to every process
        accelerator.save_state(folder[0])
        if before_fetch is not None:
            replay_file = Path(folder[0]) / REPLAY_RNG.format(accelerator.process_index)
            replay_file.write_text(json.dumps(before_fetch.to_dict()))
        if main:
            if best is not None:
                safetensors.torch.save_file(best.state, temporary / BEST_WEIGHTS)
                safetensors.numpy.save_file({"probs": best.probs, "targets": best.targets,
                                             "mask": best.mask.astype(np.uint8)}, temporary / BEST_PREDICTIONS)
            if ema is not None:
                safetensors.torch.save_file(contiguous_state(ema.module), temporary / EMA_WEIGHTS)
            saved = {**run.to_dict(), "fingerprint": fingerprint, "world_size": accelerator.num_processes,
                     "batch_size": cfg.batch_size, "train_config": asdict(cfg),
                     "best": best.summary() if best is not None else None}
            (temporary / STATE_FILE).write_text(json.dumps(saved))  # the folder is renamed in whole: no temp file
        accelerator.wait_for_everyone()  # every process's part is in before the folder is renamed
    if main:
        for old in list_checkpoints(root)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path, fingerprint: str, cfg: TrainConfig,
                    accelerator: Accelerator) -> tuple[RunState, BestEpoch | None]:
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
    check_optimizer_layout(path, saved["train_config"], cfg)
    if changed:
        accelerator.print(f"warning: resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
    if saved["best"] is None:  # stopped inside the first epoch
        return RunState.from_dict(saved), None
    predictions = safetensors.numpy.load_file(path / BEST_PREDICTIONS)
    best = BestEpoch(**saved["best"], state=safetensors.torch.load_file(path / BEST_WEIGHTS),
                     probs=predictions["probs"], targets=predictions["targets"], mask=predictions["mask"].astype(bool))
    return RunState.from_dict(saved), best


def check_optimizer_layout(path: Path, saved: dict, cfg: TrainConfig) -> None:
    """Raise AttrclfError when the settings that decide which parameters the optimizer holds, and in which groups,
    differ from the checkpoint's: its state could not be loaded into this run's optimizer. A setting the checkpoint
    predates counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    differ = [name for name in OPTIMIZER_LAYOUT if saved.get(name, defaults[name]) != getattr(cfg, name)]
    if differ:
        was = ", ".join(f"--{n.replace('_', '-')} {saved.get(n, defaults[n])}" for n in differ)
        now = ", ".join(f"{getattr(cfg, n)}" for n in differ)
        raise AttrclfError(f"--resume: checkpoint '{path}' was trained with {was}; this run asks for {now} (a "
                           f"default may have changed since), so its optimizer holds other parameters. Add {was} "
                           f"to the command to resume, or start afresh")


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



# ---------------------------------------------------------------- resuming inside an epoch


@dataclass
class RandomState:
    """The host's random generators (torch CPU, numpy, Python's), and CUDA's when captured with `devices`."""

    torch_cpu: list[int]
    numpy: list
    python: list
    cuda: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls, devices: bool = False) -> RandomState:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        cuda = torch.cuda.get_rng_state_all() if devices and torch.cuda.is_available() else None
        return cls(torch.get_rng_state().tolist(), [name, keys.tolist(), position, has_gauss, gauss],
                   [version, list(internal), gauss_next], cuda)

    def restore(self) -> None:
        torch.set_rng_state(torch.tensor(self.torch_cpu, dtype=torch.uint8))
        name, keys, position, has_gauss, gauss = self.numpy
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = self.python
        random.setstate((version, tuple(internal), gauss_next))
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def to_dict(self) -> dict:
        return {"torch_cpu": self.torch_cpu, "numpy": self.numpy, "python": self.python}


@dataclass
class Replay:
    """The part of an epoch that a mid-epoch checkpoint had trained: its batches are drawn again, in the same order
    with the same augmentation (the loader is seeded per epoch), but not trained.

    Random draws that matter come from two places: the loader's workers (seeded per epoch: redrawing the batches puts
    them where they were) and the main process's generators (augmentation without workers, dropout). Those are put
    back twice: `before_fetch` just before the loader is asked for the last trained batch (Accelerate's loader fetches
    one batch ahead, so that request also prepares the next batch), then `after_step`, the state after the last
    trained step, which accelerate's load_state restored.
    """

    batches: int  # steps of this epoch already trained
    before_fetch: RandomState
    after_step: RandomState

    def skip(self, batches):
        """`batches` (the epoch's loader) after the trained ones, with the random state of the uninterrupted run."""
        iterator = iter(batches)
        for index in range(1, self.batches + 1):
            if index == self.batches:
                self.before_fetch.restore()
            next(iterator, None)
        self.after_step.restore()
        yield from iterator


def read_replay(path: Path, run: RunState, accelerator: Accelerator) -> Replay | None:
    """The replay of a mid-epoch checkpoint just loaded (call it right after load_state); None at an epoch's end."""
    batches = run.steps_into_epoch()
    if not batches:
        return None
    saved = json.loads((path / REPLAY_RNG.format(accelerator.process_index)).read_text())
    return Replay(batches, RandomState(**saved), RandomState.capture(devices=True))
