"""Stopping on a signal the way a cluster scheduler sends one: SIGTERM, SIGINT (Ctrl-C) or SIGHUP ends training safely.

SLURM, Kubernetes and cloud spot machines send SIGTERM first and SIGKILL some seconds later; a terminal sends SIGINT.
While `stop_on_signals()` is active (the train command), a signal never kills the process mid-write:
- in the training loop it only marks the request; at the next step boundary (or validation batch) every process
  agrees on it (an all-reduce of the signal number, so the ranks stop at the same step even when only one was
  signalled), attrclf.engine writes a checkpoint of that step, and `Stopped` ends the command with one line;
- before the loop (data loading, setup) and after it (finalising, writing the outputs) it raises `Stopped` at once:
  nothing in --output-dir has been replaced yet, and the atomic writers remove their temporary files;
- a second Ctrl-C more than a second after the first stops without waiting for the checkpoint.

A process started by `accelerate launch` (or torchrun) follows its launcher: it gets SIGTERM when the launcher dies
(Linux prctl PR_SET_PDEATHSIG, elsewhere a thread that watches the parent), so killing the launcher never leaves a rank
running on as an orphan that later overwrites the outputs. Signal handlers are process-wide, so the active handler is
module state (`active()`), installed and removed by the one context manager.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_ENVIRONMENT = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")  # set by torchrun / accelerate launch
REPEAT_SECONDS = 1.0  # the same signal again within this is one request (a launcher forwarding what a group got)

_active: Preemption | None = None


class StopRequested(Exception):  # noqa: N818 (not an error: a request the loop acts on)
    """Raised at a step boundary once every process agreed to stop; attrclf.engine.fit catches it and checkpoints.

    `before_fetch` is the random state from just before the loader was asked for the last trained batch (see
    attrclf.checkpoints.Replay); `checkpoint` is set when the request came right after an epoch's checkpoint.
    """

    def __init__(self, signum: int, before_fetch=None, checkpoint: Path | None = None):
        super().__init__(signal_name(signum))
        self.signum, self.before_fetch, self.checkpoint = signum, before_fetch, checkpoint


def leave_stop_signals_to_the_main_process(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: stop signals sent to the whole process group are the main process's to act on.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the group; a worker they killed would make
    torch report it with a traceback while the main process is still writing its checkpoint. So the worker ignores
    SIGINT and SIGHUP, and takes SIGTERM only from its parent: the main process ends a worker that way when it
    shuts the loader down (torch's own rule, which this keeps). SIGTERM is blocked in the worker and a thread
    reads each one with its sender (sigwaitinfo): from the parent the worker exits at once; from anyone else it
    is dropped. (Ignoring SIGTERM outright would hang a main process that exits on an error: multiprocessing's
    exit handler terminates its daemonic workers and waits for them.) A worker whose main process was killed
    outright ends on its own (torch's watchdog of the parent)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX: nothing to read the sender with
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from_parent_only, daemon=True, name="attrclf-worker-sigterm").start()


def _sigterm_from_parent_only() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_main_rank() -> bool:
    """Whether this is rank 0 (torchrun / accelerate set RANK); before Accelerate starts, from the environment."""
    return os.environ.get("RANK", "0") == "0"


class Preemption:
    """The handler's state: the first signal received, and whether the code is in a phase that defers it."""

    def __init__(self, output_dir: str | Path):
        self.pid = os.getpid()
        self.signum = 0  # the first stop signal received; 0 = none
        self.received = 0.0  # its time.monotonic()
        self.deferring = False  # in the training loop: mark only, the loop stops at a step boundary
        self.phase = "before training started"
        self.output_dir = str(output_dir)
        self.before_fetch = None  # the latest random state before a training batch was fetched (engine sets it)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker forked from this process: the main process decides
            return
        if self.signum:
            late = time.monotonic() - self.received > REPEAT_SECONDS
            if signum == signal.SIGINT and late:  # a second Ctrl-C: the user does not want to wait
                raise Stopped(f"stopped by a second SIGINT {self.phase}, without a checkpoint; nothing in "
                              f"{self.output_dir} was replaced", signum, quiet=not is_main_rank())
            return
        self.signum, self.received = signum, time.monotonic()
        if not self.deferring:
            raise self.stopped_now()

    def stopped_now(self) -> Stopped:
        """The stop outside the training loop: nothing of this run was written to the outputs."""
        return Stopped(f"stopped by {signal_name(self.signum)} {self.phase}: nothing in {self.output_dir} was "
                       f"replaced", self.signum, quiet=not is_main_rank())

    def agreed(self, accelerator) -> int:
        """The signal any process received (0 for none), the same on every process: a collective, so every process
        calls it at the same points."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


@contextmanager
def stop_on_signals(output_dir: str | Path) -> Iterator[Preemption]:
    """Install the handlers for one training command (and follow the launcher, when there is one)."""
    global _active
    preemption = Preemption(output_dir)
    preemption.install()
    _active = preemption
    try:
        follow_parent()
        yield preemption
    finally:
        _active = None
        preemption.uninstall()


def active() -> Preemption | None:
    """The handler of the running train command; None elsewhere (tests that call `fit` directly, a notebook)."""
    return _active


@contextmanager
def training_loop(output_dir: str | Path) -> Iterator[Preemption | None]:
    """The training loop's phase: a signal is deferred to the next step boundary. After it, until the outputs are
    written, a signal stops at once (the outputs stay as they were; the checkpoints stay for --resume)."""
    preemption = _active
    if preemption is None:
        yield None
        return
    preemption.output_dir, preemption.deferring = str(output_dir), True
    preemption.phase = "during training"
    try:
        yield preemption
    finally:
        preemption.deferring = False
        preemption.phase = "before the outputs were saved (the checkpoints are kept: --resume saves them)"
    if preemption.signum:  # it arrived as the loop ended: honour it now
        raise preemption.stopped_now()


def check(accelerator, before_fetch=None, checkpoint: Path | None = None) -> None:
    """A safe point of the training loop: raise StopRequested when any process received a stop signal.

    `before_fetch` (at a training step) is remembered for the checkpoint's replay; a check during validation reuses
    the last one. A no-op outside the train command.
    """
    preemption = _active
    if preemption is None or not preemption.deferring:
        return
    if before_fetch is not None:
        preemption.before_fetch = before_fetch
    signum = preemption.agreed(accelerator)
    if signum:
        preemption.signum = preemption.signum or signum
        raise StopRequested(signum, preemption.before_fetch, checkpoint)


def stopped(request: StopRequested, *, epoch: int, step: int, checkpoint: Path | None, output_dir: str,
            main: bool) -> Stopped:
    """The one line that ends a run stopped in the training loop."""
    if checkpoint is not None:
        where = f"checkpoint {checkpoint} written; continue with the same command plus --resume"
    else:
        where = "no checkpoint written (--keep-checkpoints 0); start again to train"
    return Stopped(f"stopped by {signal_name(request.signum)} at epoch {epoch} step {step}: {where} (nothing else in "
                   f"{output_dir} was replaced)", request.signum, quiet=not main)


# ---------------------------------------------------------------- following the launcher


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process."""
    return any(name in os.environ for name in LAUNCHER_ENVIRONMENT)


def follow_parent() -> None:
    """Under a launcher, get SIGTERM when it dies (a process run from a shell keeps the shell's rules: nohup)."""
    if not launched():
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="attrclf-parent-watch").start()
    if os.getppid() != parent or parent == 1:  # it died before we asked to follow it
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
