"""xmodaler-accel: X-modaler's vision-language training engine, rebuilt on HuggingFace Accelerate."""

from .checkpoint import load_weights
from .config import Config, ConfigError, load_config, save_config
from .engine import Engine, NonFiniteLossError, TrainingInterrupted
from .evaluation import gather_predictions, write_eval_result
from .events import Event, EventBus
from .samplers import ResumableSampler, build_train_loader

__version__ = "0.1.0"

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
