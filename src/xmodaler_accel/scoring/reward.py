"""SCST reward: weighted CIDEr-D plus optional BLEU-4 (X-modaler's ``SCORER.TYPES/WEIGHTS``)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from .bleu import bleu_counts, sentence_bleu
from .cider import CiderD, cider_from_stats
from .tensors import as_index_array, as_token_array, like_input

__all__ = ["RewardScorer"]


class RewardScorer:
    """``cider_weight * CIDEr-D + bleu_weight * BLEU-4`` per candidate, from one n-gram join.

    BLEU-4 is coco-caption's sentence-level BLEU (closest reference length, its smoothing) on
    the same token ids CIDEr-D sees.
    """

    def __init__(self, cider: CiderD, *, cider_weight: float = 1.0, bleu_weight: float = 0.0):
        self.cider, self.cider_weight, self.bleu_weight = cider, cider_weight, bleu_weight

    @classmethod
    def from_corpus(
        cls,
        refs: Sequence[Sequence[Sequence[int]]],
        image_ids: Sequence[Hashable] | None = None,
        *,
        eos_id: int | None,
        pad_id: int | None = None,
        include_eos: bool = True,
        cache_path: str | os.PathLike | None = None,
        cider_weight: float = 1.0,
        bleu_weight: float = 0.0,
    ) -> RewardScorer:
        """Scorer over training references; see :meth:`CiderD.from_corpus` for the arguments."""
        cider = CiderD.from_corpus(
            refs,
            image_ids,
            eos_id=eos_id,
            pad_id=pad_id,
            include_eos=include_eos,
            cache_path=cache_path,
        )
        return cls(cider, cider_weight=cider_weight, bleu_weight=bleu_weight)

    def terms(self, image_index: Any, candidates: Any) -> dict[str, np.ndarray]:
        """Each reward term per candidate: ``{"CIDEr": [B], "Bleu_4": [B]}`` (BLEU if weighted)."""
        corpus = self.cider.corpus
        stats = corpus.match(as_index_array(image_index), as_token_array(candidates))
        out = {"CIDEr": cider_from_stats(stats, corpus, self.cider.sigma)}
        if self.bleu_weight:
            out["Bleu_4"] = sentence_bleu(bleu_counts(stats, corpus))[:, 3]
        return out

    def score(self, image_index: Any, candidates: Any) -> np.ndarray | torch.Tensor:
        """Weighted reward per candidate, a float64 tensor on the candidates' device if given one."""
        terms = self.terms(image_index, candidates)
        reward = self.cider_weight * terms["CIDEr"]
        if "Bleu_4" in terms:
            reward = reward + self.bleu_weight * terms["Bleu_4"]
        return like_input(reward, candidates)

    __call__ = score
