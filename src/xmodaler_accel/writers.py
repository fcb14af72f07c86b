"""Accelerate trackers that Accelerate lacks: a console line and `metrics.jsonl`.

TensorBoard and W&B use Accelerate's own trackers; `setup.default_writers` picks them from config.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

logger = logging.getLogger("xmodaler_accel")


class JSONLTracker(GeneralTracker):
    """One JSON object per `log` call with its `step`, appended to `metrics.jsonl` and flushed."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._file = None

    @property
    def tracker(self) -> Any:
        return self._file

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self._file is None:
            self.start()
        self._file.write(json.dumps({"step": step, **_plain(values)}) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ConsoleTracker(GeneralTracker):
    """`step 120/1000  eta 0:01:23  loss 2.3456  lr 1.00e-04 ...` through the package logger."""

    name = "console"
    requires_logging_directory = False

    def __init__(self, max_steps: int | Callable[[], int]) -> None:
        super().__init__()
        self._max_steps = max_steps
        self._last: tuple[int, float] | None = None

    @property
    def tracker(self) -> Any:
        return logger

    @property
    def max_steps(self) -> int:
        return self._max_steps() if callable(self._max_steps) else self._max_steps

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        now = time.perf_counter()
        parts = [f"step {step}/{self.max_steps}"]
        if self._last is not None and step is not None and step > self._last[0]:
            per_step = (now - self._last[1]) / (step - self._last[0])
            eta = datetime.timedelta(seconds=int(per_step * max(self.max_steps - step, 0)))
            parts.append(f"eta {eta}")
        if step is not None:
            self._last = (step, now)
        parts += [_format(k, v) for k, v in values.items()]
        logger.info("  ".join(parts))


def _format(name: str, value: Any) -> str:
    if isinstance(value, float):
        if name.startswith("lr"):
            return f"{name} {value:.2e}"
        return f"{name} {value:.4g}"
    return f"{name} {value}"


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}
