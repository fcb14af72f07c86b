"""The pretraining recipe's config keys (the YAML files document each one)."""

from __future__ import annotations

from typing import Any

from ...config import DEFAULTS
from ...data.source import DATASET_DEFAULTS

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
