"""What X-modaler's (detectron2's) hooks and writers read as `trainer.storage`: scalar histories.

Scalars put by hooks (`time`, `data_time`, `lr`, evaluation results, anything `put_scalar`-ed)
and the step metrics a `PeriodicWriter` collects land here, each with the iteration it belongs
to, and in `engine.scalars` for our writers. The step's own outputs stay on the device between
writes, so `history("loss")` holds one value per write, not one per step.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from typing import Any

_current: list[EventStorage] = []  # the storage of the run in progress, for get_event_storage()


class HistoryBuffer:
    """The newest `max_length` (value, iteration) pairs of one scalar; `global_avg` is over all."""

    def __init__(self, max_length: int = 100_000) -> None:
        self._data: deque[tuple[float, int]] = deque(maxlen=max_length)
        self._count = 0
        self._global_sum = 0.0

    def update(self, value: float, iteration: int) -> None:
        self._data.append((float(value), int(iteration)))
        self._count += 1
        self._global_sum += float(value)

    def latest(self) -> float:
        return self._data[-1][0]

    def _window(self, window_size: int) -> list[float]:
        return [v for v, _ in itertools.islice(reversed(self._data), window_size)]

    def median(self, window_size: int) -> float:
        return statistics.median(self._window(window_size))

    def avg(self, window_size: int) -> float:
        window = self._window(window_size)
        return sum(window) / len(window)

    def global_avg(self) -> float:
        return self._global_sum / self._count

    def values(self) -> list[tuple[float, int]]:
        return list(self._data)


class EventStorage:
    """The part of detectron2's EventStorage that hooks and writers use, over an Engine.

    `iter` is the trainer's iteration (see `TrainerView.iter`); `put_scalar` also sets
    `engine.scalars[name]`, which our writers log at the next write.
    """

    def __init__(self, view: Any) -> None:
        self._view = view
        self._history: dict[str, HistoryBuffer] = {}
        self._latest: dict[str, tuple[float, int]] = {}
        self._smoothing_hints: dict[str, bool] = {}

    @property
    def iter(self) -> int:
        return self._view.iter

    iteration = iter

    def put_scalar(self, name: str, value: float, smoothing_hint: bool = True) -> None:
        self.record(name, value, smoothing_hint)
        self._view.scalars[name] = float(value)

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs: float) -> None:
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def record(self, name: str, value: float, smoothing_hint: bool = True) -> None:
        """Add to the history only (not to what our writers log every period)."""
        value = float(value)
        self._history.setdefault(name, HistoryBuffer()).update(value, self.iter)
        self._latest[name] = (value, self.iter)
        self._smoothing_hints.setdefault(name, smoothing_hint)

    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"No history metric available for {name}!")
        return self._history[name]

    def histories(self) -> dict[str, HistoryBuffer]:
        return self._history

    def latest(self) -> dict[str, tuple[float, int]]:
        return self._latest

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        return {
            k: (self._history[k].median(window_size) if self._smoothing_hints[k] else v, it)
            for k, (v, it) in self._latest.items()
        }

    def smoothing_hints(self) -> dict[str, bool]:
        return self._smoothing_hints

    def activate(self) -> None:
        """Make this the storage `get_event_storage()` returns (at the start of training)."""
        _current[:] = [self]


def get_event_storage() -> EventStorage:
    """The storage of the run in progress, as detectron2's `get_event_storage()` (for writers)."""
    if not _current:
        raise RuntimeError("get_event_storage() has to be called inside a training run")
    return _current[-1]
