"""How a script talks to its user: one-line errors for bad input, and log lines printed by the main process only."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


class UserInputError(ValueError):
    """A problem with the command line, the data or the output folder: reported as one line, without a traceback."""


def run_main(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a script's main(), turning a user error into one `error: ...` line on stderr (from the main process only,
    in a multi-process run) and exit status 2."""
    try:
        main(None)
    except UserInputError as error:
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def is_main_process() -> bool:
    """True in the process of global rank 0, also before accelerate's state exists (launchers set RANK)."""
    return os.environ.get("RANK", "0") == "0"


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


def get_logger(name: str) -> logging.Logger:
    """A standard logger whose records only the main process emits: usable before the Accelerator exists (accelerate's
    own logger raises then), and a multi-process run prints its start-up block and data warnings once."""
    logger = logging.getLogger(name)
    if not any(isinstance(existing, _MainProcessOnly) for existing in logger.filters):
        logger.addFilter(_MainProcessOnly())
    return logger
