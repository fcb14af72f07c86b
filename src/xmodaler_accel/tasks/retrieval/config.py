"""The retrieval recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ...config import CHOICES, DEFAULTS, Config, load_config
from ...data.source import DATASET_DEFAULTS

RETRIEVAL_DEFAULTS: dict[str, Any] = {
    **DEFAULTS,
    "train": {
        **DEFAULTS["train"],
        "hard_negatives": False,
        "negatives": 3,
        "negative_pool": 0,
        "negative_side": "both",
    },
    "eval": {**DEFAULTS["eval"], "splits": ["val"]},
    "data": {
        **DATASET_DEFAULTS,
        "tokenizer": "wordpiece",
        "max_length": 40,
        "max_feat_num": 50,
    },
    "retrieval": {
        "eval_images": 0,
        "image_chunk": 8,
        "similarity_chunk": 256,
        "rerank_k": 0,
        "rerank_weights": "",
    },
}

# Enumerated keys, checked at load (a typo stops the run before data and model are built).
RETRIEVAL_CHOICES: dict[str, tuple[Any, ...]] = {
    **CHOICES,
    "train.negative_side": ("text", "image", "both"),
    "model.two_stream.loss": ("max_violation", "infonce"),
}


def load_retrieval_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The recipe's config: the YAML over `RETRIEVAL_DEFAULTS`, then the command-line overrides."""
    return load_config(path, overrides, defaults=RETRIEVAL_DEFAULTS, choices=RETRIEVAL_CHOICES)
