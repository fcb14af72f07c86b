"""The VCR recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

from typing import Any

from ...config import DEFAULTS
from ...data.source import DATASET_DEFAULTS

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
