"""How the backend reports what it is doing: a log is any callable taking one line; the default prints to stderr."""

from __future__ import annotations

import sys
from typing import Callable

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """One line on stderr, flushed at once (the worker's log and the CLI's progress)."""
    print(message, file=sys.stderr, flush=True)
