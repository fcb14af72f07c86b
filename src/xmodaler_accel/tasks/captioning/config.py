"""The captioning recipes' config keys, and how SCST resolves its settings from the XE config.

`recipes/xe.py` and `recipes/scst.py` read the same YAML. SCST settings come from one rule:
base YAML < the file's `scst:` section (overrides of the same keys) < command-line overrides.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...checkpoint import find_resume_checkpoint
from ...config import (
    CHOICES,
    DEFAULTS,
    Config,
    ConfigError,
    apply_section,
    load_config,
    resolve_config,
)
from ...data.source import DATASET_DEFAULTS
from .steps import BASELINES, SAMPLERS


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


CAPTION_DEFAULTS: dict[str, Any] = _merged(
    DEFAULTS,
    {
        "train": {
            # X-modaler: SCHEDULED_SAMPLING.START_EPOCH / INC_EVERY_EPOCH / INC_PROB / MAX_PROB
            "scheduled_sampling": {"start_epoch": 0, "every": 5, "prob": 0.05, "max_prob": 0.25},
            "ema_decay": 0.0,  # > 0 evaluates with EMA weights
        },
        "eval": {"splits": ["val", "test"], "metrics": ["bleu", "meteor", "rouge", "cider"]},
        "decode": {"beam_size": 3, "max_len": 20, "length_norm": False},
        # The self-critical step (recipes/scst.py only).
        "rl": {
            "sampler": "sample",  # sample | beam
            "baseline": "greedy",  # greedy | mean | leave_one_out
            "samples_per_image": 5,
            "temperature": 1.0,
            "cider_weight": 1.0,
            "bleu_weight": 0.0,
        },
        # recipes/scst.py sets these keys over the others (output_dir, train.max_steps, optim.lr
        # ...); the command line still wins. Empty: SCST would reuse the XE run's settings.
        "scst": {},
        "data": {
            **DATASET_DEFAULTS,
            "max_feat_num": 50,
            "use_global_v": False,
            "seq_per_img": 5,
            "max_seq_len": 20,
            # XE caption width rounded up to a multiple: 8 bounds torch.compile's recompiles
            # (and CUDA graphs) to a few widths; 1 pads to the batch's longest caption.
            "pad_multiple": 1,
        },
    },
)


CAPTION_CHOICES = {**CHOICES, "rl.sampler": SAMPLERS, "rl.baseline": BASELINES}


def load_caption_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The XE config: the YAML over `CAPTION_DEFAULTS`, then the command-line overrides."""
    unresolved = _unresolved(path, overrides)
    cfg = _resolve(unresolved, str(path))
    # A typo in `scst:` stops XE too, not hours later.
    _resolve(apply_section(unresolved, "scst"), f"{path} (scst section)")
    return cfg


def _unresolved(path: str | os.PathLike, overrides: Iterable[str]) -> Config:
    return load_config(path, overrides, defaults=CAPTION_DEFAULTS, sections=["scst"], resolve=False)


def _resolve(cfg: Config, source: str) -> Config:
    """`${key}` references resolved, types and choices checked."""
    cfg = resolve_config(cfg, CAPTION_DEFAULTS, CAPTION_CHOICES, source=source)
    if cfg.data.pad_multiple < 1:
        raise ConfigError(
            f"{source}: data.pad_multiple must be 1 or more, got {cfg.data.pad_multiple}"
        )
    return cfg


def load_scst_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The SCST config: base YAML < its `scst:` section < command line.

    Without `model.weights`, SCST starts from the newest checkpoint of the XE run of the same
    config and command line, and `model.weights` records which one (so `config.yaml` is what ran).
    """
    overrides = list(overrides)
    xe = load_caption_config(path, overrides)
    # References (`${key}`) resolve after the section: they see the values SCST runs with.
    cfg = _resolve(apply_section(_unresolved(path, overrides), "scst", overrides), str(path))
    if not cfg.model.weights:
        cfg.model.weights = str(_newest_xe_checkpoint(xe, cfg, path))
    return cfg


def _newest_xe_checkpoint(xe: Config, scst: Config, path: Any) -> Path:
    xe_dir = Path(xe.output_dir)
    if xe_dir.resolve() == Path(scst.output_dir).resolve():
        raise ConfigError(
            f"SCST would write into the XE run's directory {xe_dir}: set scst.output_dir in "
            f"{path} (or give model.weights=<XE checkpoint> with output_dir=<new dir>)"
        )
    checkpoint = find_resume_checkpoint(xe_dir / "checkpoints", xe.checkpoint.prefix)
    if checkpoint is None:
        raise ConfigError(
            f"SCST starts from XE weights, and {xe_dir / 'checkpoints'} holds no "
            f"checkpoint: run `python recipes/xe.py --config {path}` first, or give "
            "model.weights=<checkpoint dir or .safetensors>"
        )
    return checkpoint
