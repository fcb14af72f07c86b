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


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's BOS, EOS and PAD ids as captioner arguments (those it defines): ours are
    1, 2, 0; an X-modaler vocabulary has BOS = EOS = PAD = 0 (`load_vocab` puts '.' first)."""
    names = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}
    found = {arg: getattr(tokenizer, attr, None) for arg, attr in names.items()}
    return {arg: int(value) for arg, value in found.items() if value is not None}


def captioner_from_config(cfg: Config, tokenizer: Any, table: Any) -> torch.nn.Module:
    """The `model.kind` captioner sized by `model.<kind>`, with `model.weights` loaded if set
    (our checkpoints, or an X-modaler `.pth`: see `port.weights`); token ids are the
    tokenizer's."""
    model = build_captioner(
        cfg.model.kind,
        vocab_size=len(tokenizer),
        feat_dim=feature_dim(table),
        max_len=cfg.decode.max_len,
        **token_ids(tokenizer),
        **cfg.model[cfg.model.kind],
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model
