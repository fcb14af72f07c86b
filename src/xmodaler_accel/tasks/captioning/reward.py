"""The SCST reward: CIDEr-D (+ optional BLEU-4) on token ids against the training references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import Config
from ...data.source import dataset_dir
from ...scoring import RewardScorer


def training_references(table: Any, tokenizer: Any) -> list[list[list[int]]]:
    """Token ids of every training caption, per image in table order, without BOS/EOS."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    refs = []
    for captions in table["captions"]:
        encoded = tokenizer(list(captions))["input_ids"]
        refs.append([[t for t in ids if t not in special] for ids in encoded])
    return refs


def build_reward_scorer(cfg: Config, table: Any, tokenizer: Any) -> RewardScorer:
    """The scorer of `rl.cider_weight`/`rl.bleu_weight`; document frequencies are cached next to
    the dataset (or in output_dir when that is read-only) and rebuilt if stale."""
    cache_dir = dataset_dir(cfg) / "cider_cache"
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError:
        cache_dir = Path(cfg.output_dir) / "cider_cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
    return RewardScorer.from_corpus(
        training_references(table, tokenizer),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        cache_path=cache_dir,
        cider_weight=cfg.rl.cider_weight,
        bleu_weight=cfg.rl.bleu_weight,
    )
