"""The one exception type for bad input (data, flags, model folders), and the CLI edge that prints it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class AttrclfError(Exception):
    """Bad input a user can fix: the message says what, where and what to do.

    Raised anywhere in attrclf; the CLIs catch it and print the message without a traceback.
    """


EXIT_BAD_INPUT = 2


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`: an AttrclfError becomes `error: ...` on stderr and exit code 2, no traceback."""
    try:
        return main(argv) or 0
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
