"""Collate functions: pad regions (with masks) and token ids into batches.

Plain functions of a list of dataset items; bind options with `functools.partial` to use one as
`DataLoader(collate_fn=...)`. Region tensors are [B, N, ...] with `region_mask` True for real
regions; N is the longest image after `max_feat_num` truncation (X-modaler default 50), plus
one when `use_global_v` prepends the mean feature (box [0, 0, 1, 1, 1], label -1).
XE batches keep one feature row per image and `seq_per_img` caption rows per image (image-major),
so a model encodes each image once and expands after the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..masking import IGNORE_INDEX

GLOBAL_BOX = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)


def pad_regions(
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    *,
    max_feat_num: int = 50,
    use_global_v: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [B, N, D] float32, boxes [B, N, 5], region_mask [B, N] bool)."""
    limit = max_feat_num if max_feat_num > 0 else None
    counts = [len(f[:limit]) for f in features]
    offset = int(use_global_v)
    size = max(counts) + offset
    dim = features[0].shape[1]
    feats = np.empty((len(features), size, dim), dtype=np.float32)
    locs = np.zeros((len(features), size, 5), dtype=np.float32)
    mask = np.zeros((len(features), size), dtype=bool)
    for b, (feat, box, count) in enumerate(zip(features, boxes, counts)):
        if use_global_v:
            # The mean of the regions kept, as X-modaler's datasets (after MAX_FEAT_NUM - 1).
            feats[b, 0] = feat[:count].mean(axis=0, dtype=np.float32)
            locs[b, 0] = GLOBAL_BOX
        feats[b, offset : offset + count] = feat[:count]
        feats[b, offset + count :] = 0.0
        locs[b, offset : offset + count] = box[:count]
        mask[b, : offset + count] = True
    return torch.from_numpy(feats), torch.from_numpy(locs), torch.from_numpy(mask)


def pad_ids(
    sequences: Sequence[np.ndarray], *, pad_id: int = 0, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] int64 padded with `pad_id`, mask [B, T] bool True for real tokens); T is the
    longest sequence rounded up to a `multiple` (a few widths: a few compiled graphs)."""
    length = max((len(s) for s in sequences), default=0)
    length = -(-length // multiple) * multiple
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _pad_region_extras(
    items: Sequence[dict[str, Any]], max_feat_num: int, use_global_v: bool, size: int
) -> dict[str, torch.Tensor]:
    """region_labels [B, N] (-1 padding) and cls_prob [B, N, C] (zero padding) when present."""
    out: dict[str, torch.Tensor] = {}
    limit = max_feat_num if max_feat_num > 0 else None
    offset = int(use_global_v)
    if "region_labels" in items[0]:
        labels = np.full((len(items), size), -1, dtype=np.int64)
        for b, item in enumerate(items):
            row = item["region_labels"][:limit]
            labels[b, offset : offset + len(row)] = row
        out["region_labels"] = torch.from_numpy(labels)
    if "cls_prob" in items[0]:
        probs = np.zeros((len(items), size, items[0]["cls_prob"].shape[1]), dtype=np.float32)
        for b, item in enumerate(items):
            row = item["cls_prob"][:limit]
            probs[b, offset : offset + len(row)] = row
        out["cls_prob"] = torch.from_numpy(probs)
    return out


def collate_images(
    items: Sequence[dict[str, Any]], *, max_feat_num: int = 50, use_global_v: bool = False
) -> dict[str, Any]:
    """Image side of a batch: padded regions, masks, ids (also the evaluation batch)."""
    feats, boxes, mask = pad_regions(
        [item["features"] for item in items],
        [item["boxes"] for item in items],
        max_feat_num=max_feat_num,
        use_global_v=use_global_v,
    )
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
        "features": feats,
        "boxes": boxes,
        "region_mask": mask,
    }
    batch.update(_pad_region_extras(items, max_feat_num, use_global_v, mask.shape[1]))
    return batch


def collate_pairs(
    items: Sequence[dict[str, Any]],
    *,
    max_feat_num: int = 50,
    use_global_v: bool = False,
    pad_id: int = 0,
) -> dict[str, Any]:
    """(image, caption) pairs for retrieval or pretraining; text-only items give text only."""
    if "features" in items[0]:
        batch = collate_images(items, max_feat_num=max_feat_num, use_global_v=use_global_v)
    else:
        batch = {
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
        }
    ids, mask = pad_ids([item["input_ids"] for item in items], pad_id=pad_id)
    batch.update(
        input_ids=ids,
        attention_mask=mask,
        image_index=torch.tensor([item["image_index"] for item in items], dtype=torch.long),
    )
    return batch


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `prob` of non-special tokens; 80% -> mask, 10% random, 10% kept.

    Returns (masked ids, labels with IGNORE_INDEX where nothing is predicted).
    """
    draw = torch.rand(input_ids.shape, generator=generator)
    picked = (draw < prob) & ~special
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    how = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(picked & (how < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(picked & (how >= 0.8) & (how < 0.9), random_ids, masked)
    return masked, labels


def mask_regions(
    features: torch.Tensor,
    region_mask: torch.Tensor,
    *,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-region modelling: pick `prob` of real regions and zero 90% of the picked ones.

    Returns (features with zeroed regions, picked [B, N] bool: the regions to predict).
    """
    picked = (torch.rand(region_mask.shape, generator=generator) < prob) & region_mask
    zero = picked & (torch.rand(region_mask.shape, generator=generator) < 0.9)
    return features.masked_fill(zero[..., None], 0.0), picked
