"""Converting batches between torch, numpy and Python lists for the scorers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .ngrams import pad_sequences

__all__ = ["as_index_array", "as_token_array", "like_input"]


def as_token_array(candidates: Any) -> np.ndarray:
    """``[B, T]`` int64 ids from a tensor, an array or ragged lists (padded with -1)."""
    if isinstance(candidates, torch.Tensor):
        candidates = candidates.detach().cpu().numpy()
    if isinstance(candidates, np.ndarray):
        if candidates.ndim != 2:
            raise ValueError(f"candidates must be [batch, length], got shape {candidates.shape}")
        return candidates.astype(np.int64, copy=False)
    return pad_sequences([list(c) for c in candidates])


def as_index_array(index: Any) -> np.ndarray:
    """``[B]`` int64 image indices from a tensor, an array or a list."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    return np.asarray(index, dtype=np.int64).reshape(-1)


def like_input(
    scores: np.ndarray, candidates: Sequence | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """Scores as a float64 tensor on the candidates' device when they came as a tensor."""
    if isinstance(candidates, torch.Tensor):
        return torch.from_numpy(scores).to(candidates.device)
    return scores
