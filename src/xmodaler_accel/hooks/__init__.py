"""Hooks: plain callables and small classes with `attach(engine)`."""

from .base import CallbackHook, HookBase, TrainerView, register_hooks
from .common import (
    AutogradProfiler,
    IterationTimer,
    LRScheduler,
    ModelWeightsManipulating,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from .ema import EMA
from .eval import EvalHook
from .precise_bn import PreciseBN, update_bn_stats

__all__ = [
    "EMA",
    "AutogradProfiler",
    "CallbackHook",
    "EvalHook",
    "HookBase",
    "IterationTimer",
    "LRScheduler",
    "ModelWeightsManipulating",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "PreciseBN",
    "TrainerView",
    "register_hooks",
    "update_bn_stats",
]
