"""Exponential moving average of the weights, updated on device with no host sync."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..events import Event
from ..sharding import full_tensor, shaped_like
from .common import PeriodicCheckpointer


class EMA:
    """Shadow weights `ema = decay * ema + (1 - decay) * w` after every optimizer step.

    With `warmup`, the decay ramps as `min(decay, (1 + n) / (10 + n))` over the first updates
    (as TensorFlow's ExponentialMovingAverage with num_updates). Float buffers are averaged too.
    Use `with ema.swapped(model):` to evaluate with the averaged weights; `EvalHook(ema=...)` does.
    Under FSDP each process averages its own shards; checkpoints hold the whole tensors.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}

    def attach(self, engine: Any, name: str = "EMA") -> EMA:
        """Subscribe; `name` keys the shadow weights in checkpoints (one name per EMA). Attach
        it before the PeriodicCheckpointer: a checkpoint written at a step before this step's
        average would resume one update short."""
        saver = [
            s.name
            for s in engine.events.subscriptions()
            if s.event is Event.STEP_END
            and isinstance(getattr(s.fn, "__self__", None), PeriodicCheckpointer)
        ]
        if saver:
            raise ValueError(
                f"attach {name} before {saver[0]}: hooks run in the order attached, and a "
                "checkpoint written before this step's average would resume one update short"
            )
        engine.on(Event.TRAIN_START, self.init, name=name)
        engine.on(Event.STEP_END, self.update, name=name)
        return self

    def _float_params(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: t for n, t in model.state_dict().items() if t.dtype.is_floating_point}

    def init(self, engine: Any) -> None:
        params = self._float_params(engine.unwrapped_model)
        if self.shadow:  # restored from a checkpoint: whole tensors, laid out as the parameters
            self.shadow = {n: shaped_like(t, params[n]) for n, t in self.shadow.items()}
        else:
            self.shadow = {n: t.detach().clone() for n, t in params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, engine: Any) -> None:
        current = self._float_params(engine.unwrapped_model)
        names = list(self.shadow)
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_([self.shadow[n] for n in names], [current[n] for n in names], weight)
        self.updates += 1

    @contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into `model` (the unwrapped module)."""
        params = self._float_params(model)
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, t in self.shadow.items():
                params[n].copy_(t)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in backup.items():
                    params[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        # Collective under FSDP (shards are gathered); every process saves through the Engine.
        return {
            "updates": self.updates,
            "shadow": {n: full_tensor(t) for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}
