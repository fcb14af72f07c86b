"""The retrieval recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

from typing import Any

from ...config import DEFAULTS
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
