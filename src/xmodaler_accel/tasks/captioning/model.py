"""The captioner a config asks for (`model.kind`, sized by `model.<kind>`)."""

from __future__ import annotations

from typing import Any

import torch

from ...checkpoint import load_weights
from ...config import Config
from ...models import build_captioner


def feature_dim(table: Any) -> int:
    """Region feature size of an image table (read from its schema, not from the data)."""
    return int(table.features["features"].shape[1])


def captioner_from_config(cfg: Config, tokenizer: Any, table: Any) -> torch.nn.Module:
    """The `model.kind` captioner sized by `model.<kind>`, with `model.weights` loaded if set."""
    model = build_captioner(
        cfg.model.kind,
        vocab_size=len(tokenizer),
        feat_dim=feature_dim(table),
        max_len=cfg.decode.max_len,
        **cfg.model[cfg.model.kind],
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model
