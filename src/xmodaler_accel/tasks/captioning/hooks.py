"""Captioning hooks: X-modaler's scheduled sampling, and the time split of an SCST step."""

from __future__ import annotations

from typing import Any

from ...events import Event

SCST_PARTS = ("time_generate", "time_reward", "time_forward")


class ScheduledSampling:
    """X-modaler's scheduled sampling: raise `model.ss_prob` by `increase_prob` every
    `increase_every` epochs after `start_epoch`, up to `max_prob`."""

    def __init__(
        self, start_epoch: int, increase_every: int, increase_prob: float, max_prob: float
    ) -> None:
        self.start_epoch, self.increase_every = start_epoch, max(1, increase_every)
        self.increase_prob, self.max_prob = increase_prob, max_prob

    def attach(self, engine: Any) -> ScheduledSampling:
        engine.on(Event.EPOCH_START, self)
        return self

    def probability(self, epoch: int) -> float:
        if epoch <= self.start_epoch:
            return 0.0
        steps = (epoch - self.start_epoch) // self.increase_every
        return min(self.increase_prob * steps, self.max_prob)

    def __call__(self, engine: Any) -> None:
        prob = self.probability(engine.epoch)
        engine.unwrapped_model.ss_prob = prob
        engine.scalars["ss_prob"] = prob


class SCSTTimeSplit:
    """Log `time_backward` (backward + optimizer) beside the parts `scst_step` times itself.

    Reads `engine.step_time`, which the Engine measures around the step's own work, so the split
    does not depend on which other hooks run at STEP_END or in what order.
    """

    def attach(self, engine: Any, name: str = "SCSTTimeSplit") -> SCSTTimeSplit:
        engine.on(Event.STEP_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        if all(p in engine.scalars for p in SCST_PARTS):
            rest = engine.step_time - sum(engine.scalars[p] for p in SCST_PARTS)
            engine.scalars["time_backward"] = max(rest, 0.0)
