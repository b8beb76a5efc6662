"""Writing files so that a reader sees the old content or the new, never half of one; and telling paths from Hub ids.

Every file that matters (model, metrics, checkpoints, exports) is written under a temporary name in the same folder and
renamed into place: a rename within one filesystem is atomic, so a kill or a full disk mid-write leaves the previous
file as it was. Everything in attrclf that writes such a file calls these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the mode an ordinary write would (0644 / 0755 under a 022 umask), not mkstemp's private 0600."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is removed.

    For writers that want a file name (safetensors, onnx.save, matplotlib): `with atomic_path(p) as tmp: save(tmp)`.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        public_mode(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write bytes or text (UTF-8) to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2) -> Path:
    """Write `value` as JSON to `path` atomically."""
    return atomic_write(path, json.dumps(value, indent=indent))


@contextmanager
def atomic_folder(path: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on a clean exit it replaces the folder `path`, else it is removed.

    Readers of `path` see the old folder or the whole new one. The old folder is removed just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{prefix}{path.name}-", dir=path.parent))
    try:
        yield temporary
        public_mode(temporary, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.rename(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def write_each(folder: str | os.PathLike, fill: Callable[[Path], None], prefix: str = ".staging-") -> list[str]:
    """Let `fill` write files into a staging folder inside `folder`, then rename each into `folder`; returns the names.

    Unlike atomic_folder this keeps the other files of `folder` (a model folder that also holds checkpoints).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    try:
        fill(staging)
        written = sorted(p.name for p in staging.iterdir())
        with signals_held():  # a stop signal waits for the renames: the folder never mixes two runs' files
            for name in written:
                public_mode(staging / name, directory=(staging / name).is_dir())
                os.replace(staging / name, folder / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM / SIGINT / SIGHUP (they are delivered at the end) around a few renames that belong together."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def looks_like_path(text: str) -> bool:
    """True for text that names a local file or folder (existing, or written like a path), not a Hub id."""
    return os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") != 1


def is_hub_id(text: str | os.PathLike) -> bool:
    """True for `namespace/name` that is not a local path: the form of a Hub model or dataset id."""
    return not looks_like_path(str(text))
