"""Captioning hooks: the time split of an SCST step (scheduled sampling: hooks.ScheduledSampling)."""

from __future__ import annotations

from typing import Any

from ...events import Event

SCST_PARTS = ("time_generate", "time_reward", "time_forward")


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
