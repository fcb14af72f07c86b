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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, WandBTracker, on_main_process

from .config import DEFAULTS

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
    """`step 120/1000  loss 2.346  lr 0.0001  ...  eta 0:01:23` through the package logger.

    Training writes show `fields` (`logging.console_fields`: loss first; every metric is in
    metrics.jsonl and the other trackers), 4 significant figures. An evaluation's
    `<split>/<metric>` call is left to `EvalHook`, which logs one line per split."""

    name = "console"
    requires_logging_directory = False

    def __init__(
        self, max_steps: int | Callable[[], int], fields: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self._max_steps = max_steps
        self.fields = tuple(DEFAULTS["logging"]["console_fields"] if fields is None else fields)
        self._last: tuple[int, float] | None = None
        self._checked = False

    @property
    def tracker(self) -> Any:
        return logger

    @property
    def max_steps(self) -> int:
        return self._max_steps() if callable(self._max_steps) else self._max_steps

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if is_evaluation(values):
            return
        self._check_fields(values)
        parts = [f"step {step}/{self.max_steps}"]
        parts += [f"{k} {format_value(values[k])}" for k in self.fields if k in values]
        now = time.perf_counter()
        if self._last is not None and step is not None and step > self._last[0]:
            per_step = (now - self._last[1]) / (step - self._last[0])
            eta = datetime.timedelta(seconds=int(per_step * max(self.max_steps - step, 0)))
            parts.append(f"eta {eta}")
        if step is not None:
            self._last = (step, now)
        logger.info("  ".join(parts))

    def _check_fields(self, values: dict) -> None:
        """Name, once, the configured fields the first training write does not have."""
        if self._checked:
            return
        self._checked = True
        missing = [k for k in self.fields if k not in values]
        if missing and list(self.fields) != DEFAULTS["logging"]["console_fields"]:
            logger.warning(
                "logging.console_fields: %s not reported by this run's step; it reports %s",
                ", ".join(missing),
                ", ".join(sorted(values)),
            )


def is_evaluation(values: dict) -> bool:
    """An evaluation's call: every key is `<split>/<metric>` (what `EvalHook` logs)."""
    return bool(values) and all("/" in key for key in values)


def format_value(value: Any) -> str:
    """4 significant figures for floats (tensors included), integers as they are."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {format_value(v)}" for k, v in metrics.items())


class WandBWriter(WandBTracker):
    """Accelerate's W&B tracker, with the names W&B dashboards group by.

    What the `PeriodicWriter` logs goes under `train/` (`train/loss`, `train/lr`, `train/epoch`,
    `train/samples_per_s` ...). An evaluation's `<split>/<metric>` (every key of the call holds
    a `/`: what `EvalHook` and the sample tables log) goes under `eval/` (`eval/val/CIDEr`). A
    key already under `train/` or `eval/` is kept as it is. Console and `metrics.jsonl` keep the
    plain names (`loss`, `val/CIDEr`). `record_model` puts the parameter counts in the run config.

    `init_kwargs` are `wandb.init`'s; `setup.init_trackers` completes them before the run starts.
    """

    def __init__(self, project: str, *, mode_source: str = "", **init_kwargs: Any) -> None:
        super().__init__(project, **init_kwargs)
        self.mode_source = mode_source  # where init_kwargs["mode"] came from, for the log

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        prefix = "eval" if is_evaluation(values) else "train"
        self.run.log({_under(prefix, k): v for k, v in values.items()}, step=step, **kwargs)

    @on_main_process
    def record_model(self, model: Any) -> None:
        """`num_parameters` and `num_trainable_parameters` into the run config."""
        self.run.config.update(parameter_counts(model), allow_val_change=True)


def wandb_tracker(accelerator: Any) -> Any | None:
    """The W&B tracker when W&B is logging, else None (the same answer on every process)."""
    return next((t for t in getattr(accelerator, "trackers", []) if t.name == "wandb"), None)


def _under(prefix: str, key: str) -> str:
    return key if key.startswith(("train/", "eval/")) else f"{prefix}/{key}"


def parameter_counts(model: Any) -> dict[str, int]:
    """The whole model's parameter count (also when FSDP or ZeRO-3 shard it), and the trainable."""
    total = trainable = 0
    for param in model.parameters():
        n = int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 keeps a placeholder
        total += n
        trainable += n if param.requires_grad else 0
    return {"num_parameters": total, "num_trainable_parameters": trainable}


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}
