"""Progress bars (tqdm) for training, evaluation and data building.

A bar shows on the main process, and only when stderr is a terminal: in a log file, under Slurm
or in CI the log lines carry the progress instead of carriage-return noise. While a bar is open
the package's log lines are written above it (tqdm.write), so the bar stays on the last line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

PACKAGE_LOGGER = "xmodaler_accel"


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    main_process: bool = True,
    leave: bool = False,
    initial: int = 0,
) -> tqdm:
    """A tqdm bar, disabled off the main process and off a terminal (it then costs nothing)."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        initial=initial,
        dynamic_ncols=True,
        disable=not (main_process and on_terminal()),
    )


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
    """Route the package logger's console output through tqdm.write while bars may be open."""
    with logging_redirect_tqdm(loggers=[logging.getLogger(PACKAGE_LOGGER)]):
        yield
