"""The everyday hooks as small classes with `attach(engine)`, taking our arguments or X-modaler's.

Each reads the Engine's counters and host-side values only; none moves a tensor to the host except
the writer (through `engine.collect_metrics`, the engine's one sync point for metrics). Scalars go
through `trainer_view(engine).storage` (X-modaler's `trainer.storage`) into `engine.scalars`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..events import Event
from ..progress import logs_above_bars, progress_bar
from ..writers import format_metrics
from .base import trainer_view
from .compat import bind_either, first_argument

logger = logging.getLogger(__name__)


class IterationTimer:
    """Step and data-loading time per step; the first `warmup` steps are left out of the average.

    `time` is the Engine's `step_time` (the step's own work), so it does not depend on which
    other hooks run at STEP_START or STEP_END, or in what order. X-modaler: `warmup_iter=`.
    """

    def __init__(self, warmup: int = 5, *, warmup_iter: int | None = None) -> None:
        self.warmup = warmup if warmup_iter is None else warmup_iter
        self._first_step: int | None = None
        self.total_time = 0.0
        self.timed_steps = 0

    def attach(self, engine: Any, name: str = "IterationTimer") -> IterationTimer:
        trainer_view(engine)  # made now, it follows the run from TRAIN_START
        engine.on(Event.STEP_END, self.after_step, name=name)
        engine.on(Event.TRAIN_END, self.summary, name=name)
        return self

    def after_step(self, engine: Any) -> None:
        if self._first_step is None:  # warmup starts at the first step timed (after a resume too)
            self._first_step = engine.step - 1
        storage = trainer_view(engine).storage
        storage.put_scalars(time=engine.step_time, data_time=engine.data_time)
        if engine.step - self._first_step > self.warmup:
            self.total_time += engine.step_time
            self.timed_steps += 1

    @property
    def seconds_per_step(self) -> float:
        return self.total_time / self.timed_steps if self.timed_steps else float("nan")

    def summary(self, engine: Any) -> None:
        if self.timed_steps:
            logger.info(
                "training speed: %d steps in %.2f s (%.4f s/step, first %d steps not counted)%s",
                self.timed_steps,
                self.total_time,
                self.seconds_per_step,
                self.warmup,
                _peak_memory(engine.device),
            )


def _peak_memory(device: torch.device) -> str:
    """ "; peak GPU memory N MiB" (this process, since it started) on CUDA, else ""."""
    if device.type != "cuda":
        return ""
    return f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"


class PeriodicWriter:
    """Every `period` steps (and at the end): reduce metrics and send them to the trackers.

    It writes at `Event.LOG`, after every STEP_END hook, so it logs the step's scalars (lr,
    timings ...) wherever it is attached. X-modaler's `PeriodicWriter(writers, period)`: the
    writers with a `write()` (X-modaler EventWriters, reading `trainer.storage` or
    `get_event_storage()`, where the reduced metrics are put) are called at the same points and
    closed at the end, also when training raises; the others (our `default_writers`, Accelerate
    trackers) are the Accelerator's already.
    """

    def __init__(self, writers: Iterable[Any] | int | None = None, period: int = 20) -> None:
        if isinstance(writers, int):  # ours: PeriodicWriter(period)
            writers, period = None, writers
        self.period = period
        self.writers = [w for w in writers or () if callable(getattr(w, "write", None))]
        self.last_written = -1
        self.bar: Any = None
        self._logs_above_bar: Any = None
        self._last_write: tuple[int, float] | None = None  # (step, time) for samples_per_s

    def attach(self, engine: Any, name: str = "PeriodicWriter") -> PeriodicWriter:
        trainer_view(engine)  # made now, it follows the run from TRAIN_START
        engine.on(Event.TRAIN_START, self.open_bar, name=name)
        engine.on(Event.TRAIN_START, self.record_model, name=name)
        engine.on(Event.STEP_END, self.advance_bar, name=name)
        engine.on(Event.EVAL, self.skip_period, name=name)
        engine.on(Event.LOG, self.write, every=self.period, name=name)
        engine.on(Event.TRAIN_END, self.write, name=name)
        engine.on(Event.TRAIN_END, self.close, name=name)
        engine.on(Event.EXCEPTION, self.close, name=name)
        return self

    def open_bar(self, engine: Any) -> None:
        """The training bar (main process, on a terminal): steps/s and ETA, loss and lr."""
        self.bar = progress_bar(
            desc="train",
            total=engine.max_steps,
            initial=engine.step,
            unit="step",
            main_process=engine.is_main_process,
            leave=True,
        )
        if not self.bar.disable:
            self._logs_above_bar = logs_above_bars()
            self._logs_above_bar.__enter__()

    def advance_bar(self, engine: Any) -> None:
        if self.bar is not None:
            self.bar.update(engine.step - self.bar.n)

    def write(self, engine: Any) -> None:
        if engine.step == self.last_written:
            return
        metrics, storage = engine.collect_metrics(), trainer_view(engine).storage
        for key, value in metrics.items():
            storage.record(key, value)
        progress = self.progress(engine)
        engine.accelerator.log({**metrics, **engine.scalars, **progress}, step=engine.step)
        if self.bar is not None and not self.bar.disable:
            shown = {k: metrics[k] for k in ("loss", "reward") if k in metrics}
            lr = engine.scalars.get("lr")
            self.bar.set_postfix_str(format_metrics({**shown, "lr": lr} if lr else shown))
        for writer in self.writers:
            writer.write()
        self.last_written = engine.step

    def progress(self, engine: Any) -> dict[str, float]:
        """`epoch` (fractional: passes over the training set) and `samples_per_s` (training
        samples per second since the previous write, over all processes; left out of a period
        that held an evaluation)."""
        out: dict[str, float] = {}
        try:
            dataset_size = len(engine.train_loader.dataset)
        except TypeError:  # a dataset without a length: no epochs to count
            dataset_size = 0
        if dataset_size:
            out["epoch"] = engine.epoch + engine.samples_in_epoch / dataset_size
        now = time.perf_counter()
        if self._last_write is not None and engine.step > self._last_write[0]:
            per_step = engine.global_batch_size * engine.accelerator.gradient_accumulation_steps
            seconds = now - self._last_write[1]
            out["samples_per_s"] = (engine.step - self._last_write[0]) * per_step / seconds
        self._last_write = (engine.step, now)
        return out

    def skip_period(self, engine: Any) -> None:
        self._last_write = None  # an evaluation's time is not training time

    def record_model(self, engine: Any) -> None:
        """Trackers that keep the model's size (W&B's run config) get it once, at the start."""
        for tracker in engine.accelerator.trackers:
            if callable(getattr(tracker, "record_model", None)):
                tracker.record_model(engine.unwrapped_model)

    def close(self, engine: Any) -> None:
        self.close_bar()
        for writer in self.writers:
            if engine.exception is not None:  # X-modaler writes what the storage holds first
                writer.write()
            if callable(getattr(writer, "close", None)):
                writer.close()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._logs_above_bar is not None:
            self._logs_above_bar.__exit__(None, None, None)
            self._logs_above_bar = None


def _ours_checkpointer(period: int, max_to_keep: int | None = None, prefix: str | None = None):
    """PeriodicCheckpointer(period, max_to_keep=None, prefix=None): the Engine's checkpoints."""


def _xmodaler_checkpointer(
    checkpointer: Any,
    period: int,
    max_iter: int | None = None,
    max_to_keep: int | None = None,
    file_prefix: str = "model",
):
    """X-modaler's: `checkpointer.save(name, **extra)` every `period` iterations and at the end."""


class PeriodicCheckpointer:
    """Save every `period` steps and at the end, keeping the newest `max_to_keep`.

    `PeriodicCheckpointer(period, max_to_keep=None, prefix=None)` writes the Engine's checkpoints
    (`checkpoints/<prefix>_<step>`, what `--resume` reads). X-modaler's
    `PeriodicCheckpointer(checkpointer, period, max_iter=None, max_to_keep=None,
    file_prefix="model")` calls `checkpointer.save("<file_prefix>_Epoch_<e>_Iter_<i>",
    iteration=i)` after iterations i with (i + 1) % period == 0 and `"<file_prefix>_final"` after
    the last one (`max_iter`: the Engine's `max_steps` once training starts), removing all but the
    newest `max_to_keep` (`checkpointer.get_checkpoint_file()`); `step(iteration)` and
    `save(name, **extra)` as X-modaler's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        first = first_argument(args, kwargs, "checkpointer")
        use_xmodaler = "checkpointer" in kwargs or (bool(args) and not isinstance(first, int))
        bound = bind_either(
            "PeriodicCheckpointer",
            args,
            kwargs,
            _ours_checkpointer,
            _xmodaler_checkpointer,
            use_xmodaler,
        )
        self.checkpointer = bound.get("checkpointer")
        self.period, self.max_to_keep = bound["period"], bound["max_to_keep"]
        self.prefix = bound.get("prefix")
        self.file_prefix = bound.get("file_prefix", "model")
        self.max_iter: int | None = bound.get("max_iter")
        self.recent_checkpoints: list[str] = []
        self._engine: Any = None

    def attach(self, engine: Any, name: str = "PeriodicCheckpointer") -> PeriodicCheckpointer:
        self._engine, self.trainer = engine, trainer_view(engine)
        if self.checkpointer is None:
            engine.on(Event.STEP_END, self._save_engine, every=self.period, name=name)
            engine.on(Event.TRAIN_END, self.save_final, name=name)
        else:
            engine.on(Event.TRAIN_START, self.before_train, name=name)
            engine.on(Event.STEP_END, self.after_step, name=name)
        return self

    # ours
    def _save_engine(self, engine: Any) -> None:
        engine.save_checkpoint(prefix=self.prefix, keep=self.max_to_keep)

    def save_final(self, engine: Any) -> None:
        if self.period <= 0 or engine.step % self.period:
            self._save_engine(engine)

    # X-modaler's
    def before_train(self, engine: Any) -> None:
        self.max_iter = engine.max_steps

    def after_step(self, engine: Any) -> None:
        iteration = self.trainer.iter
        self.step(iteration, epoch=(iteration + 1) // self.trainer.iters_per_epoch)

    def step(self, iteration: int, epoch: int | None = None, **kwargs: Any) -> None:
        """After iteration `iteration` (0-based): save when (iteration + 1) % period == 0 and,
        with an X-modaler checkpointer, `<file_prefix>_final` after the last iteration."""
        iteration = int(iteration)
        if self.checkpointer is None:
            if self.period > 0 and (iteration + 1) % self.period == 0:
                self._save_engine(self._engine)
            return
        extra = {"iteration": iteration, **kwargs}
        if self.period > 0 and (iteration + 1) % self.period == 0:
            if epoch is None:  # fvcore's PeriodicCheckpointer
                name = f"{self.file_prefix}_{iteration:07d}"
            else:  # X-modaler's PeriodicEpochCheckpointer
                name = f"{self.file_prefix}_Epoch_{int(epoch):05d}_Iter_{iteration:07d}"
            self.save(name, **extra)
            self._keep_newest()
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.save(f"{self.file_prefix}_final", **extra)

    def save(self, name: str | None = None, **extra: Any) -> None:
        """X-modaler's `checkpointer.save(name, **extra)`; without a checkpointer, the Engine's
        checkpoint `<prefix>_<step>` (its name is not ours to choose)."""
        if self.checkpointer is not None:
            self.checkpointer.save(name, **extra)
        elif name is not None:
            raise ValueError(
                "PeriodicCheckpointer.save(name) needs an X-modaler checkpointer; the Engine "
                "names its checkpoints <prefix>_<step>: call save() without a name"
            )
        else:
            self._save_engine(self._engine)

    def _keep_newest(self) -> None:
        if self.max_to_keep is None or not hasattr(self.checkpointer, "get_checkpoint_file"):
            return
        self.recent_checkpoints.append(self.checkpointer.get_checkpoint_file())
        if len(self.recent_checkpoints) > self.max_to_keep:
            oldest = self.recent_checkpoints.pop(0)
            if os.path.exists(oldest) and not oldest.endswith(f"{self.file_prefix}_final.pth"):
                os.remove(oldest)


class LRScheduler:
    """Log the learning rate of every param group (the Engine steps the scheduler).

    X-modaler's `LRScheduler(optimizer=None, scheduler=None)`: a `scheduler` given here, for an
    Engine built without one, becomes the Engine's (stepped once per optimizer step, saved in
    checkpoints); `optimizer` is the one whose rates are logged (default the Engine's).
    """

    def __init__(self, optimizer: Any | None = None, scheduler: Any | None = None) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def attach(self, engine: Any, name: str = "LRScheduler") -> LRScheduler:
        if self.scheduler is not None and self.scheduler is not engine.scheduler:
            if engine.scheduler is not None:
                raise ValueError(
                    "LRScheduler(scheduler=...) and Engine(scheduler=...) are two schedulers "
                    "for one run: give it to one of them"
                )
            engine.scheduler = self.scheduler  # before any resume, which restores its state
        trainer_view(engine)  # made now, it follows the run from TRAIN_START
        engine.on(Event.STEP_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        groups = (self.optimizer or engine.optimizer).param_groups
        storage = trainer_view(engine).storage
        storage.put_scalar("lr", groups[0]["lr"], smoothing_hint=False)
        for i, group in enumerate(groups[1:], start=1):
            storage.put_scalar(f"lr_group{i}", group["lr"], smoothing_hint=False)


class AutogradProfiler:
    """Profile the steps for which `enable_predicate(trainer)` holds; a Chrome trace per step.

    The predicate gets X-modaler's trainer (`trainer.iter`: the 0-based step about to run), which
    also answers the Engine's names (`trainer.step`). `use_cuda`: trace CUDA too, when present.
    """

    def __init__(
        self,
        enable_predicate: Callable[[Any], bool],
        output_dir: str | Path,
        *,
        use_cuda: bool = True,
    ) -> None:
        self.predicate = enable_predicate
        self.output_dir = Path(output_dir)
        self.use_cuda = use_cuda
        self._profiler: torch.profiler.profile | None = None

    def attach(self, engine: Any, name: str = "AutogradProfiler") -> AutogradProfiler:
        self.trainer = trainer_view(engine)
        engine.on(Event.STEP_START, self.before_step, name=name)
        engine.on(Event.STEP_END, self.after_step, name=name)
        return self

    def before_step(self, engine: Any) -> None:
        if not self.predicate(self.trainer):
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.use_cuda and torch.cuda.is_available():
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
    """Apply `fn(model)` before the given steps run (freeze, unfreeze, re-initialise ...).

    X-modaler's `ModelWeightsManipulating()` (no arguments): call the model's
    `bind_or_init_weights()`, when it has one, as training starts (a resumed run too).
    """

    def __init__(
        self, fn: Callable[[torch.nn.Module], None] | None = None, steps: Iterable[int] = ()
    ) -> None:
        self.fn, self.steps = fn, sorted(set(steps))

    def attach(
        self, engine: Any, name: str = "ModelWeightsManipulating"
    ) -> ModelWeightsManipulating:
        if self.fn is None:
            engine.on(Event.TRAIN_START, self.bind_or_init_weights, name=name)
            return self
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

    def bind_or_init_weights(self, engine: Any) -> None:
        model = engine.unwrapped_model
        if hasattr(model, "bind_or_init_weights"):
            model.bind_or_init_weights()


class ScheduledSampling:
    """X-modaler's `ScheduledSampling(start_iter, inc_every_iter, inc_prob, max_prob)`: the model's
    `ss_prob` is `min(inc_prob * ((n - start_iter) // inc_every_iter), max_prob)` once `n`, the
    steps done, exceeds `start_iter` (0 before). X-modaler's build_hooks gives epoch counts times
    `iters_per_epoch`, so the probability rises at epoch boundaries.

    Set after every step and as training starts, so a resumed run's first step has the value
    an uninterrupted run has (X-modaler's trainer starts from 0.0 until its first step ends).
    Models that read `ss_prob`: our Transformer and Up-Down captioners.
    """

    def __init__(self, start_iter: int, inc_every_iter: int, inc_prob: float, max_prob: float):
        self.start_iter, self.inc_every_iter = start_iter, max(1, inc_every_iter)
        self.inc_prob, self.max_prob = inc_prob, max_prob

    def attach(self, engine: Any, name: str = "ScheduledSampling") -> ScheduledSampling:
        engine.on(Event.TRAIN_START, self, name=name)
        engine.on(Event.STEP_END, self, name=name)
        return self

    def probability(self, steps_done: int) -> float:
        if steps_done <= self.start_iter:
            return 0.0
        increments = (steps_done - self.start_iter) // self.inc_every_iter
        return min(self.inc_prob * increments, self.max_prob)

    def __call__(self, engine: Any) -> None:
        prob = self.probability(engine.step)
        engine.unwrapped_model.ss_prob = prob
        trainer_view(engine).ss_prob = prob  # X-modaler's hooks and models read trainer.ss_prob
        engine.scalars["ss_prob"] = prob
