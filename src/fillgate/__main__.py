"""The ``fillgate`` command's entry point (also ``python -m fillgate``).

Ctrl-C while the command is still starting (importing, before anything can be written) ends
it at once with exit 130 and one line, never a traceback; once the command runs, Ctrl-C is
handled by the command itself (see ``fillgate.interrupts``).
"""

from __future__ import annotations

# The handler goes in before anything else is imported: ``_signal`` and ``os`` are loaded by
# the interpreter itself, while ``signal`` imports ``enum`` (slow enough for a Ctrl-C to land
# in it and print a traceback from the standard library).
import _signal  # type: ignore[import-not-found]  # (no stubs: the C half of signal)
import os
from types import FrameType

EXIT_INTERRUPTED = 130


def _while_starting(_signum: int, _frame: FrameType | None) -> None:
    os.write(2, b"interrupted: stopped by Ctrl-C while starting; nothing was written.\n")
    os._exit(EXIT_INTERRUPTED)


_default = _signal.signal(_signal.SIGINT, _while_starting)


def main() -> None:
    _signal.signal(_signal.SIGINT, _while_starting)
    from fillgate.cli import main as cli_main

    _signal.signal(_signal.SIGINT, _default)
    cli_main()


if __name__ == "__main__":
    main()
