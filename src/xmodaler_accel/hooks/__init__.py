"""Hooks: plain callables and small classes with `attach(engine)`; the classes also take
X-modaler's constructor arguments, so a hook list written as X-modaler's
`DefaultTrainer.build_hooks` writes it runs through `register_hooks(engine, hooks)`."""

from .base import CallbackHook, HookBase, TrainerView, register_hooks, trainer_view
from .common import (
    AutogradProfiler,
    IterationTimer,
    LRScheduler,
    ModelWeightsManipulating,
    PeriodicCheckpointer,
    PeriodicWriter,
    ScheduledSampling,
)
from .ema import EMA
from .eval import EvalHook
from .precise_bn import PreciseBN, update_bn_stats
from .storage import EventStorage, HistoryBuffer, get_event_storage

__all__ = [
    "EMA",
    "AutogradProfiler",
    "CallbackHook",
    "EvalHook",
    "EventStorage",
    "HistoryBuffer",
    "HookBase",
    "IterationTimer",
    "LRScheduler",
    "ModelWeightsManipulating",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "PreciseBN",
    "ScheduledSampling",
    "TrainerView",
    "get_event_storage",
    "register_hooks",
    "trainer_view",
    "update_bn_stats",
]
