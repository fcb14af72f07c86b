"""Accelerate trackers that Accelerate lacks: a console line and `metrics.jsonl`; and W&B with
W&B's conventions for names (`WandBWriter`).

TensorBoard uses Accelerate's own tracker; `setup.default_writers` picks the writers from config.
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

from accelerate.tracking import GeneralTracker, WandBTracker, on_main_process

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


class WandBWriter(WandBTracker):
    """Accelerate's W&B tracker, with the names W&B dashboards group by.

    What the `PeriodicWriter` logs goes under `train/` (`train/loss`, `train/lr` ...), with
    `train/epoch` (fractional: passes over the training set) and `train/samples_per_s` (training
    samples per second since the previous write, over all processes; left out of a period that
    held an evaluation) taken from the Engine that runs. An evaluation's `<split>/<metric>`
    (every key of the call holds a `/`: what `EvalHook` and the sample tables log) goes under
    `eval/` (`eval/val/CIDEr`). A key already under `train/` or `eval/` is kept as it is. The
    model's parameter count goes into the run config (`num_parameters`,
    `num_trainable_parameters`) at the first write. Console and `metrics.jsonl` keep the plain
    names (`loss`, `val/CIDEr`).

    `init_kwargs` are `wandb.init`'s; `setup.init_trackers` completes them before the run starts.
    """

    def __init__(self, project: str, *, mode_source: str = "", **init_kwargs: Any) -> None:
        super().__init__(project, **init_kwargs)
        self.mode_source = mode_source  # where init_kwargs["mode"] came from, for the log
        self._last_write: tuple[int, float] | None = None  # (step, time) of the last train write
        self._counted = False

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if values and all("/" in key for key in values):  # an evaluation: <split>/<metric>
            self._last_write = None  # its time is not training time
            named = {_under("eval", k): v for k, v in values.items()}
        else:
            named = {_under("train", k): v for k, v in values.items()}
            named.update(self._progress(step))
        self.run.log(named, step=step, **kwargs)

    def _progress(self, step: int | None) -> dict[str, float]:
        """`train/epoch` and `train/samples_per_s` from the running Engine, if there is one."""
        engine = running_engine()
        if engine is None or step is None:
            return {}
        if not self._counted:
            self._counted = True
            self.run.config.update(parameter_counts(engine.unwrapped_model), allow_val_change=True)
        out: dict[str, float] = {}
        try:
            dataset_size = len(engine.train_loader.dataset)
        except TypeError:  # a dataset without a length: no epochs to count
            dataset_size = 0
        if dataset_size:
            out["train/epoch"] = engine.epoch + engine.samples_in_epoch / dataset_size
        now = time.perf_counter()
        if self._last_write is not None and step > self._last_write[0]:
            per_step = engine.global_batch_size * engine.accelerator.gradient_accumulation_steps
            seconds = now - self._last_write[1]
            out["train/samples_per_s"] = (step - self._last_write[0]) * per_step / seconds
        self._last_write = (step, now)
        return out


def _under(prefix: str, key: str) -> str:
    return key if key.startswith(("train/", "eval/")) else f"{prefix}/{key}"


def running_engine() -> Any | None:
    """The Engine whose training is in progress: its TrainerView (which `PeriodicWriter` and the
    other hooks make) makes its storage current at TRAIN_START. None outside a training run."""
    from .hooks import storage

    if not storage._current:
        return None
    return getattr(storage._current[-1]._view, "_engine", None)


def parameter_counts(model: Any) -> dict[str, int]:
    """The whole model's parameter count (also when FSDP or ZeRO-3 shard it), and the trainable."""
    total = trainable = 0
    for param in model.parameters():
        n = int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 keeps a placeholder
        total += n
        trainable += n if param.requires_grad else 0
    return {"num_parameters": total, "num_trainable_parameters": trainable}


def _format(name: str, value: Any) -> str:
    if isinstance(value, float):
        if name.startswith("lr"):
            return f"{name} {value:.2e}"
        return f"{name} {value:.4g}"
    return f"{name} {value}"


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}
