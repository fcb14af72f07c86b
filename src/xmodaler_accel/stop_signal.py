"""Stop on SIGTERM/SIGINT at a step boundary, every process at the same step."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved; `--resume` continues."""


class StopSignal:
    """The first SIGTERM/SIGINT asks to stop after the current step; a second one stops at once.

    With several processes, a signal may reach only some of them: they compare requests at sync
    points (the Engine sets `agreed` there) and all stop at the same step, so that they can save.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process received
        self.agreed = False  # some process had received one at the last sync point

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def should_stop(self, step: int, sync_every: int, world_size: int) -> bool:
        """Whether to stop after `step`; with several processes, only at sync points."""
        if world_size == 1:
            return self.received
        return step % sync_every == 0 and self.agreed

    def interrupted(self, step: int, checkpoint: Path) -> TrainingInterrupted:
        """The exception that ends training after `step`, once `checkpoint` holds it (logged)."""
        message = (
            f"stopped by {self.name} after step {step}; checkpoint saved to {checkpoint}. "
            "Run the same command with --resume to continue."
        )
        logger.warning(message)
        return TrainingInterrupted(message)

    @contextmanager
    def caught(self) -> Iterator[None]:
        """Record SIGTERM/SIGINT instead of dying while inside; the old handlers come back after."""
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing the current step, then saving", self.name)
