"""Pretraining evaluation: the accuracy of every head on a split's pairs, counted per pair."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...evaluation import gather_predictions
from ...masking import IGNORE_INDEX
from ...progress import progress_bar


def pair_counts(out: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
    """Per pair [B, 2 * k]: (right, total) for MLM, caption words, masked regions and ITM."""
    rows = len(batch["input_ids"])

    def tokens(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        valid = labels != IGNORE_INDEX
        return [((logits.argmax(-1) == labels) & valid).sum(1), valid.sum(1)]

    counts = tokens(out["mlm_logits"], batch["mlm_labels"])
    counts += tokens(out["caption_logits"], batch["caption_target"])
    if "region_logits" in out:
        picked = batch["region_picked"]
        agree = out["region_logits"].argmax(-1) == batch["cls_prob"].argmax(-1)
        counts += [(agree & picked).sum(1), picked.sum(1)]
    logits = out["itm_logits"]
    if len(logits) > rows:
        right = (logits[:rows] > 0).long() + (logits[rows:] <= 0).long()
        counts += [right, torch.full_like(right, 2)]
    return torch.stack(counts, dim=1)


def count_names(out: Mapping[str, torch.Tensor], rows: int, suffix: str = "") -> list[str]:
    """The metric names of `pair_counts`' columns, in order."""
    names = ["mlm_acc", "caption_acc"]
    names += ["mrm_acc"] if "region_logits" in out else []
    names += ["itm_acc"] if len(out["itm_logits"]) > rows else []
    return [name + suffix for name in names]


@torch.no_grad()
def pretrain_metrics(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    num_pairs: int,
    *,
    two_pass: bool,
    desc: str = "eval",
) -> dict[str, float]:
    """Accuracies over an evaluation loader of `collate_pretrain` batches (collective); `desc`
    names the progress bar.

    Counts are gathered per pair (`gather_predictions` drops padded duplicates and checks that
    every pair was seen once) and pooled: accuracy = right / total over the split.
    """
    ids: list[int] = []
    rows: list[list[int]] = []
    names: list[str] = []
    batches = progress_bar(
        loader, desc=desc, unit="batch", main_process=accelerator.is_local_main_process
    )
    for batch in batches:
        outs = model(batch, two_pass=two_pass)
        counts = [pair_counts(outs[0], batch)]
        names = count_names(outs[0], len(batch["input_ids"]))
        if two_pass:
            counts.append(pair_counts(outs[1], batch))
            names += count_names(outs[1], len(batch["input_ids"]), "_s2")
        ids += batch["index"].tolist()
        rows += torch.cat(counts, dim=1).tolist()
    merged = gather_predictions(accelerator, ids, [tuple(r) for r in rows], num_pairs)
    totals = np.asarray(list(merged.values()), dtype=np.int64).sum(axis=0)
    return {name: float(totals[2 * i] / max(totals[2 * i + 1], 1)) for i, name in enumerate(names)}
