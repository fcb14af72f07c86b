"""EvalHook: run an evaluation function periodically and at the end of training."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import rng_kept
from ..evaluation import write_eval_result
from ..events import Event
from ..writers import format_metrics
from .base import trainer_view
from .compat import bind_either, first_argument, flatten_results

logger = logging.getLogger(__name__)

EvalFn = Callable[[Any], dict[str, dict[str, float]]]

_XMODALER_ARGS = {
    "eval_period",
    "eval_start",
    "eval_function",
    "iters_per_epoch",
    "stage",
    "multi_gpu_eval",
}


def _ours(eval_fn: EvalFn, period: int, start: int = 0, ema: Any | None = None):
    """EvalHook(eval_fn, period, start=0, ema=None): steps; eval_fn(engine) -> {split: metrics}."""


def _xmodaler(
    eval_period: int,
    eval_start: int,
    eval_function: Callable[[int], dict | None],
    iters_per_epoch: int,
    stage: str,
    multi_gpu_eval: bool,
):
    """X-modaler's: epochs; eval_function(epoch) -> nested dict of floats (or None)."""


class EvalHook:
    """Every `period` steps after step `start`, and once at the end, call `eval_fn(engine)`.

    `eval_fn` returns `{split: {metric: value}}` (the same on every process; use
    `gather_predictions` inside it). The hook puts the model in eval mode under `no_grad`, swaps in
    EMA weights when `ema` is given, writes `eval/<split>_step<N>.json` on the main process, logs
    `<split>/<metric>` to the trackers, keeps the results in `engine.eval_results` and fires EVAL.

    X-modaler's `EvalHook(eval_period, eval_start, eval_function, iters_per_epoch, stage,
    multi_gpu_eval)`: every `eval_period` epochs of `iters_per_epoch` steps, in epochs after
    `eval_start`, and at the end, `eval_function(epoch)` (on the main process only unless
    `multi_gpu_eval`); its nested dict is flattened (`a/b`) under the split `stage` (`stage#2`
    ... for a second hook of one stage, e.g. X-modaler's EMA evaluation) and also put in
    `trainer.storage` as `<split>/<metric>`. Its default name (its state's key) is `EvalHook.<stage>.<function name>`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        first = first_argument(args, kwargs, "eval_fn")
        use_xmodaler = bool(_XMODALER_ARGS & set(kwargs)) or (bool(args) and not callable(first))
        bound = bind_either("EvalHook", args, kwargs, _ours, _xmodaler, use_xmodaler)
        self.history: list[dict[str, Any]] = []
        self.last_step = -1
        self.xmodaler_function: Callable[[int], dict | None] | None = None
        self.name = "EvalHook"
        if not use_xmodaler:
            self.eval_fn, self.period = bound["eval_fn"], bound["period"]
            self.start, self.ema = bound["start"], bound["ema"]
            return
        iters = bound["iters_per_epoch"]
        self.eval_fn, self.ema = self._call_xmodaler_function, None
        self.xmodaler_function = bound["eval_function"]
        self.iters_per_epoch, self.stage = iters, bound["stage"]
        self.multi_gpu_eval = bound["multi_gpu_eval"]
        # X-modaler: epoch = steps done // iters_per_epoch must exceed eval_start.
        self.period = bound["eval_period"] * iters
        self.start = (bound["eval_start"] + 1) * iters - 1
        self.split = self.stage
        function_name = getattr(self.xmodaler_function, "__name__", "eval_function")
        self.name = f"EvalHook.{self.stage}.{function_name}"

    def attach(self, engine: Any, name: str | None = None) -> EvalHook:
        """Subscribe; `name` keys this hook's state in checkpoints (one name per EvalHook)."""
        name = name or self.name
        if self.xmodaler_function is not None:
            trainer_view(engine)  # made now, it follows the run from TRAIN_START
            taken = {getattr(h, "split", None) for h in engine.events.stateful().values()}
            split, n = self.stage, 1
            while split in taken:
                n += 1
                split = f"{self.stage}#{n}"
            self.split = split
        engine.on(Event.STEP_END, self, every=self.period, after=self.start, name=name)
        engine.on(Event.TRAIN_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        if engine.step == self.last_step:
            return
        results = self.evaluate(engine)
        self.last_step = engine.step
        self.history.append({"step": engine.step, "results": results})
        engine.eval_results = results
        engine.fire(Event.EVAL)

    def _call_xmodaler_function(self, engine: Any) -> dict[str, dict[str, float]]:
        epoch = engine.step // self.iters_per_epoch
        results = None
        if self.multi_gpu_eval or engine.is_main_process:
            results = self.xmodaler_function(epoch)
        engine.accelerator.wait_for_everyone()
        if not results:
            return {}
        flat = flatten_results(results)
        for key, value in flat.items():
            trainer_view(engine).storage.record(f"{self.split}/{key}", value, smoothing_hint=False)
        return {self.split: flat}

    def evaluate(self, engine: Any) -> dict[str, dict[str, float]]:
        model = engine.unwrapped_model
        was_training = model.training
        model.eval()
        swap = self.ema.swapped(model) if self.ema is not None else contextlib.nullcontext()
        try:
            # Evaluation loaders draw from the global RNG: keep it where training left it.
            # The EMA weights go into the (sharded) parameters first, then they are gathered.
            with swap, engine.gathered_model(), torch.no_grad(), rng_kept():
                results = self.eval_fn(engine)
        finally:
            model.train(was_training)
        if engine.is_main_process:
            for split, metrics in results.items():
                path = write_eval_result(Path(engine.output_dir), split, engine.step, metrics)
                shown = format_metrics(metrics)
                logger.info("eval %s at step %d: %s  (%s)", split, engine.step, shown, path)
        flat = {f"{split}/{k}": v for split, m in results.items() for k, v in m.items()}
        engine.accelerator.log(flat, step=engine.step)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.history = state["last_step"], state["history"]
