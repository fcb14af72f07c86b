"""The pretraining recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ...config import CHOICES, DEFAULTS, Config, load_config
from ...data.source import DATASET_DEFAULTS
from .steps import TWO_STAGE_MODES

PRETRAIN_DEFAULTS: dict[str, Any] = {
    **DEFAULTS,
    "eval": {**DEFAULTS["eval"], "splits": ["val"]},
    "data": {
        **DATASET_DEFAULTS,
        "tokenizer": "wordpiece",
        "caption_tokenizer": "tokenizer",
        "max_length": 40,
        "max_seq_len": 20,
        "max_feat_num": 50,
    },
    "pretrain": {
        "two_stage": "separate",
        "mask_prob": 0.15,
        "region_mask_prob": 0.15,
        "label_smoothing": 0.0,
        "loss_weights": {
            "mlm": 1.0,
            "mrm_class": 1.0,
            "mrm_feature": 1.0,
            "itm": 1.0,
            "caption": 1.0,
        },
        "eval_pairs": 0,
        "export_dir": "export",
    },
}

# Enumerated keys, checked at load (a typo stops the run before data and model are built).
PRETRAIN_CHOICES: dict[str, tuple[Any, ...]] = {**CHOICES, "pretrain.two_stage": TWO_STAGE_MODES}


def load_pretrain_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The recipe's config: the YAML over `PRETRAIN_DEFAULTS`, then the command-line overrides."""
    return load_config(path, overrides, defaults=PRETRAIN_DEFAULTS, choices=PRETRAIN_CHOICES)
