"""The two conventions data, models and losses share: the ignored label and the masked mean."""

from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -100  # label of positions no loss looks at (torch's cross_entropy default)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, N, d] over the positions where mask [B, N] is True (zero where none is)."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
