"""xmodaler-accel: X-modaler's vision-language training engine, rebuilt on HuggingFace Accelerate."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each name below is imported from its module on first use: `xmodaler_accel.cli` and
# `xmodaler_accel.config` load without torch (a recipe's --help answers at once).
_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "Engine": "engine",
    "Event": "events",
    "EventBus": "events",
    "NonFiniteLossError": "engine",
    "ResumableSampler": "samplers",
    "TrainingInterrupted": "engine",
    "build_train_loader": "samplers",
    "gather_predictions": "evaluation",
    "load_config": "config",
    "load_weights": "checkpoint",
    "save_config": "config",
    "write_eval_result": "evaluation",
}

__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "Event",
    "EventBus",
    "NonFiniteLossError",
    "ResumableSampler",
    "TrainingInterrupted",
    "build_train_loader",
    "gather_predictions",
    "load_config",
    "load_weights",
    "save_config",
    "write_eval_result",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .checkpoint import load_weights
    from .config import Config, ConfigError, load_config, save_config
    from .engine import Engine, NonFiniteLossError, TrainingInterrupted
    from .evaluation import gather_predictions, write_eval_result
    from .events import Event, EventBus
    from .samplers import ResumableSampler, build_train_loader
