"""The seed's everyday hooks as small classes with `attach(engine)`.

Each reads the Engine's counters and host-side values only; none moves a tensor to the host except
the writer (through `engine.collect_metrics`, the engine's one sync point for metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..events import Event

logger = logging.getLogger(__name__)


class IterationTimer:
    """Step and data-loading time per step; the first `warmup` steps are left out of the average.

    `time` is the Engine's `step_time` (the step's own work), so it does not depend on which
    other hooks run at STEP_START or STEP_END, or in what order.
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self._first_step: int | None = None
        self.total_time = 0.0
        self.timed_steps = 0

    def attach(self, engine: Any, name: str = "IterationTimer") -> IterationTimer:
        engine.on(Event.STEP_END, self.after_step, name=name)
        engine.on(Event.TRAIN_END, self.summary, name=name)
        return self

    def after_step(self, engine: Any) -> None:
        if self._first_step is None:  # warmup starts at the first step timed (after a resume too)
            self._first_step = engine.step - 1
        engine.scalars["time"] = engine.step_time
        engine.scalars["data_time"] = engine.data_time
        if engine.step - self._first_step > self.warmup:
            self.total_time += engine.step_time
            self.timed_steps += 1

    @property
    def seconds_per_step(self) -> float:
        return self.total_time / self.timed_steps if self.timed_steps else float("nan")

    def summary(self, engine: Any) -> None:
        if self.timed_steps:
            logger.info(
                "training speed: %d steps in %.2f s (%.4f s/step, first %d steps not counted)",
                self.timed_steps,
                self.total_time,
                self.seconds_per_step,
                self.warmup,
            )


class PeriodicWriter:
    """Every `period` steps (and at the end): reduce metrics and send them to the trackers.

    It writes at `Event.LOG`, after every STEP_END hook, so it logs the step's scalars (lr,
    timings ...) wherever it is attached.
    """

    def __init__(self, period: int = 20) -> None:
        self.period = period
        self.last_written = -1

    def attach(self, engine: Any, name: str = "PeriodicWriter") -> PeriodicWriter:
        engine.on(Event.LOG, self.write, every=self.period, name=name)
        engine.on(Event.TRAIN_END, self.write, name=name)
        return self

    def write(self, engine: Any) -> None:
        if engine.step == self.last_written:
            return
        values = {**engine.collect_metrics(), **engine.scalars}
        engine.accelerator.log(values, step=engine.step)
        self.last_written = engine.step


class PeriodicCheckpointer:
    """Save every `period` steps and at the end, keeping the newest `max_to_keep`."""

    def __init__(self, period: int, max_to_keep: int | None = None, prefix: str | None = None):
        self.period, self.max_to_keep, self.prefix = period, max_to_keep, prefix

    def attach(self, engine: Any, name: str = "PeriodicCheckpointer") -> PeriodicCheckpointer:
        engine.on(Event.STEP_END, self.save, every=self.period, name=name)
        engine.on(Event.TRAIN_END, self.save_final, name=name)
        return self

    def save(self, engine: Any) -> None:
        engine.save_checkpoint(prefix=self.prefix, keep=self.max_to_keep)

    def save_final(self, engine: Any) -> None:
        if self.period <= 0 or engine.step % self.period:
            self.save(engine)


class LRScheduler:
    """Log the learning rate of every param group (the Engine steps the scheduler itself)."""

    def attach(self, engine: Any, name: str = "LRScheduler") -> LRScheduler:
        engine.on(Event.STEP_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        groups = engine.optimizer.param_groups
        engine.scalars["lr"] = groups[0]["lr"]
        for i, group in enumerate(groups[1:], start=1):
            engine.scalars[f"lr_group{i}"] = group["lr"]


class AutogradProfiler:
    """Profile the steps for which `predicate(engine)` holds; a Chrome trace per step."""

    def __init__(self, predicate: Callable[[Any], bool], output_dir: str | Path) -> None:
        self.predicate = predicate
        self.output_dir = Path(output_dir)
        self._profiler: torch.profiler.profile | None = None

    def attach(self, engine: Any, name: str = "AutogradProfiler") -> AutogradProfiler:
        engine.on(Event.STEP_START, self.before_step, name=name)
        engine.on(Event.STEP_END, self.after_step, name=name)
        return self

    def before_step(self, engine: Any) -> None:
        if not self.predicate(engine):
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def after_step(self, engine: Any) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank = engine.accelerator.process_index
        self._profiler.export_chrome_trace(
            str(self.output_dir / f"step{engine.step}_rank{rank}.json")
        )
        self._profiler = None


class ModelWeightsManipulating:
    """Apply `fn(model)` before the given steps run (freeze, unfreeze, re-initialise ...)."""

    def __init__(self, fn: Callable[[torch.nn.Module], None], steps: Iterable[int]) -> None:
        self.fn, self.steps = fn, sorted(set(steps))

    def attach(
        self, engine: Any, name: str = "ModelWeightsManipulating"
    ) -> ModelWeightsManipulating:
        for step in self.steps:
            engine.on(Event.STEP_START, self, once=step, name=name)
        # A resumed run replays manipulations of steps already done (they change the model).
        engine.on(Event.TRAIN_START, self.replay, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        self.fn(engine.unwrapped_model)

    def replay(self, engine: Any) -> None:
        for step in self.steps:
            if step <= engine.step:
                self.fn(engine.unwrapped_model)
