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

logger = logging.getLogger(__name__)

EvalFn = Callable[[Any], dict[str, dict[str, float]]]


class EvalHook:
    """Every `period` steps from `start` on, and once at the end, call `eval_fn(engine)`.

    `eval_fn` returns `{split: {metric: value}}` (the same on every process; use
    `gather_predictions` inside it). The hook puts the model in eval mode under `no_grad`, swaps in
    EMA weights when `ema` is given, writes `eval/<split>_step<N>.json` on the main process, logs
    `<split>/<metric>` to the trackers, keeps the results in `engine.eval_results` and fires EVAL.
    """

    def __init__(self, eval_fn: EvalFn, period: int, start: int = 0, ema: Any | None = None):
        self.eval_fn, self.period, self.start, self.ema = eval_fn, period, start, ema
        self.last_step = -1
        self.history: list[dict[str, Any]] = []

    def attach(self, engine: Any, name: str = "EvalHook") -> EvalHook:
        """Subscribe; `name` keys this hook's state in checkpoints (one name per EvalHook)."""
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

    def evaluate(self, engine: Any) -> dict[str, dict[str, float]]:
        model = engine.unwrapped_model
        was_training = model.training
        model.eval()
        swap = self.ema.swapped(model) if self.ema is not None else contextlib.nullcontext()
        try:
            # Evaluation loaders draw from the global RNG: keep it where training left it.
            with swap, torch.no_grad(), rng_kept():
                results = self.eval_fn(engine)
        finally:
            model.train(was_training)
        if engine.is_main_process:
            for split, metrics in results.items():
                path = write_eval_result(Path(engine.output_dir), split, engine.step, metrics)
                logger.info("eval %s at step %d: %s (%s)", split, engine.step, metrics, path)
        flat = {f"{split}/{k}": v for split, m in results.items() for k, v in m.items()}
        engine.accelerator.log(flat, step=engine.step)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.history = state["last_step"], state["history"]
