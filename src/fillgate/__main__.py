"""The ``fillgate`` command's entry point (also ``python -m fillgate``).

Ctrl-C while the command is still starting (importing, before anything can be written) ends
it at once with exit 130 and one line, never a traceback; once the command runs, Ctrl-C is
handled by the command itself (see ``fillgate.interrupts``).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130


def _while_starting(_signum: int, _frame: FrameType | None) -> None:
    sys.stderr.write("interrupted: stopped by Ctrl-C while starting; nothing was written.\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    previous = signal.signal(signal.SIGINT, _while_starting)
    from fillgate.cli import main as cli_main

    signal.signal(signal.SIGINT, previous)
    cli_main()


if __name__ == "__main__":
    main()
