"""The one exception type for bad input (data, flags, model folders), the stop on a signal, and the CLI edge that
prints both."""

from __future__ import annotations

import sys
from collections.abc import Callable


class AttrclfError(Exception):
    """Bad input a user can fix: the message says what, where and what to do.

    Raised anywhere in attrclf; the CLIs catch it and print the message without a traceback.
    """


class Stopped(Exception):  # noqa: N818 (a stop the user asked for, not an error)
    """A run ended on a signal (attrclf.preemption): the message says where it stopped and what was kept.

    The exit code is the shell's for "ended by signal N" (128 + N: 143 for SIGTERM, 130 for SIGINT), so a job script
    or `&&` sees that the run did not finish. `quiet` on the processes other than the main one: one line per run.
    """

    def __init__(self, message: str, signum: int, *, quiet: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.quiet = quiet


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`: an AttrclfError becomes `error: ...` on stderr and exit code 2, a `Stopped` its
    one line and 128 + the signal, a Ctrl-C outside a training loop `interrupted` and 130; no traceback."""
    try:
        return main(argv) or 0
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as e:
        if not e.quiet:
            print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
