"""What the machine offers a run: torch threads per process on CPU, and whether bf16 autocast pays off.

Importable on the serving path (Predictor asks `fast_cpu_bf16`): accelerate and the training config are type hints
only here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import TrainConfig


def configure_threads(cfg: TrainConfig, accelerator: Accelerator) -> int:
    """Torch threads of this process: --cpu-threads wherever the run trains; without it, on CPU each process's share
    of the cores (accelerate's launcher pins every process to one thread), on a GPU torch's own choice. An explicit
    value counts on a GPU too: several trainings on one box each took every core there and starved each other."""
    if cfg.cpu_threads is None and accelerator.device.type != "cpu":
        return torch.get_num_threads()
    threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    torch.set_num_threads(threads)
    return threads


def num_machines(world_size: int) -> int:
    """Machines in the run: the world size over the processes of one machine (torchrun's LOCAL_WORLD_SIZE, set by
    `accelerate launch`; 1 machine when the run was not launched)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    return max(1, world_size // max(1, local))


def fast_cpu_bf16() -> bool:
    """bf16 pays on a CPU only with native bf16 instructions (AVX512-BF16 or AMX); elsewhere autocast emulates it and
    runs ~30x slower than fp32 (measured on an AVX2 EPYC)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def resolve_mixed_precision(choice: str) -> str | None:
    """--mixed-precision auto -> what `accelerate launch --mixed_precision` asked for, else bf16 where it is fast
    (a bf16-capable GPU, or a CPU with native bf16), else "no". Explicit choices pass through."""
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return None  # the launcher's setting
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    if on_cpu:
        return "bf16" if fast_cpu_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"
