"""--output-dir checked before training, write failures as one line, and temporary folders swept.

A run refuses an output folder it could not write before it loads any data (`check_writable`: a file, a read-only
filesystem, no permission, a kernel filesystem such as /proc) and before its first step (`check_space`: the disk
must hold the model and the checkpoints, estimated from the parameter count). A write that fails later anyway (the
disk filled meanwhile) becomes one AttrclfError (`writing`): the atomic writers of attrclf.fileio have removed their
temporary files and left the previous model and checkpoints as they were. Temporary folders that only a SIGKILL
mid-write can leave (`.staging-*`, `checkpoints/.tmp-*`) are removed when the next run starts (`sweep`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import AttrclfError

KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")
CHECKPOINT_COPIES = 5  # a checkpoint holds the weights, AdamW's two moments, the best epoch's and the EMA's weights
SLACK_BYTES = 20 * 2**20  # plots, card, JSON files, optimizer overhead
STALE = ((".", ".staging-*"), ("checkpoints", ".tmp-*"))  # fileio.write_each / atomic_folder prefixes


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest folder that exists (where a new output folder would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(output_dir: str | os.PathLike) -> None:
    """Refuse an --output-dir that cannot hold files, in one line, before anything is loaded or written."""
    path = Path(output_dir)
    resolved = path.absolute()
    if any(resolved == Path(root) or Path(root) in resolved.parents for root in KERNEL_FILESYSTEMS):
        raise AttrclfError(f"--output-dir '{output_dir}' is under {resolved.parts[0]}{resolved.parts[1]}, a kernel "
                           f"filesystem, not storage: choose a folder on a disk")
    if path.exists() and not path.is_dir():
        raise AttrclfError(f"--output-dir '{output_dir}' is a file, not a folder: choose a folder (it is created "
                           f"when missing) or move the file")
    base = existing_ancestor(path)
    if not base.is_dir():
        raise AttrclfError(f"--output-dir '{output_dir}': '{base}' is a file, so no folder can be created there")
    try:  # the one test every filesystem answers truthfully (os.access is True for root even where writes fail)
        fd, probe = tempfile.mkstemp(prefix=".attrclf-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AttrclfError(f"--output-dir '{output_dir}' is not writable ({describe(e)} in '{base}'): choose a "
                           f"folder you can write to") from None


def needed_bytes(parameters: int, keep_checkpoints: int) -> int:
    """Disk space a run needs: the model once, and keep_checkpoints + 1 checkpoints (a new one is complete before
    the oldest is removed), fp32."""
    weights = 4 * parameters
    checkpoints = (keep_checkpoints + 1) * CHECKPOINT_COPIES * weights if keep_checkpoints else 0
    return weights + checkpoints + SLACK_BYTES


def check_space(output_dir: str | os.PathLike, parameters: int, keep_checkpoints: int) -> None:
    """Refuse to start when the output disk cannot hold the model and its checkpoints."""
    base = existing_ancestor(Path(output_dir))
    free = shutil.disk_usage(base).free
    need = needed_bytes(parameters, keep_checkpoints)
    if free < need:
        raise AttrclfError(
            f"--output-dir '{output_dir}': {megabytes(free)} free on its disk, the run needs about {megabytes(need)} "
            f"(the model, {megabytes(4 * parameters)}, and {keep_checkpoints + 1 if keep_checkpoints else 0} "
            f"checkpoint(s) of about {megabytes(4 * parameters * CHECKPOINT_COPIES)}); free some space, choose "
            f"another disk, or lower --keep-checkpoints"
        )


def megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MB"


def describe(error: BaseException) -> str:
    """'no space left on device (ENOSPC)' from an OSError or from safetensors' error, which wraps one."""
    code = getattr(error, "errno", None)
    if code is None and "No space left" in str(error):
        code = errno.ENOSPC
    if code is None:
        return str(error)
    return f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"


@contextmanager
def writing(what: str, folder: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write into one line; the atomic writers inside have already removed their temporary files."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise AttrclfError(f"could not write {what} to '{folder}': {describe(e)}. The previous model and checkpoints "
                           f"there are unchanged; free some space and run again (--resume continues from the "
                           f"last checkpoint)") from None


def sweep(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders an interrupted write left in an output folder; returns them."""
    removed = []
    for sub, pattern in STALE:
        folder = Path(output_dir) / sub
        if folder.is_dir():
            for stale in sorted(folder.glob(pattern)):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
