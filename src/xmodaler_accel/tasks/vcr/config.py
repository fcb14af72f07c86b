"""The VCR recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ...config import CHOICES, DEFAULTS, Config, load_config
from ...data.source import DATASET_DEFAULTS
from .steps import MODES

VCR_DEFAULTS: dict[str, Any] = {
    **DEFAULTS,
    "eval": {**DEFAULTS["eval"], "splits": ["val"]},
    "data": {
        **DATASET_DEFAULTS,
        "tokenizer": "wordpiece",
        "max_length_qa": 38,
        "max_length_qar": 66,
        "max_feat_num": 50,
        "use_global_v": False,
    },
    "model": {
        **DEFAULTS["model"],
        "ground_tags": True,
        "single_stream": {
            "bert_dir": "",
            "hidden": 768,
            "layers": 12,
            "heads": 12,
            "intermediate": 3072,
            "dropout": 0.1,
            "pooling": "cls",
        },
    },
    "vcr": {"mode": "sum", "qar_batch_size": 0},
}

# Enumerated keys, checked at load (a typo stops the run before data and model are built).
VCR_CHOICES: dict[str, tuple[Any, ...]] = {
    **CHOICES,
    "vcr.mode": MODES,
    "model.single_stream.pooling": ("cls", "mean"),
}


def load_vcr_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The recipe's config: the YAML over `VCR_DEFAULTS`, then the command-line overrides."""
    return load_config(path, overrides, defaults=VCR_DEFAULTS, choices=VCR_CHOICES)
