"""Vectorised CIDEr-D, as coco-caption's CiderD scores SCST rewards.

Formula (coco-caption ``cider_scorer`` / self-critical.pytorch ``ciderD_scorer``): for n = 1..4,
tf-idf vectors with ``idf = log(N) - log(max(1, df))`` (N = number of corpus images, df = images
whose references contain the n-gram), similarity ``sum min(w_c, w_r) * w_r / (|c| |r|)`` (clipped),
times a Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))`` with l = number of bigrams,
averaged over n and over the image's references, times 10.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from .corpus import CandidateStats, RefCorpus
from .tensors import as_index_array, as_token_array, like_input

__all__ = ["CiderD", "cider_from_stats"]


def cider_from_stats(stats: CandidateStats, corpus: RefCorpus, sigma: float = 6.0) -> np.ndarray:
    """CIDEr-D per candidate from the joined n-gram statistics."""
    img = stats.image_index
    denom = stats.cand_norm[:, None, :] * corpus.ref_norm_mat[img]
    val = np.where(denom != 0, stats.dot / np.where(denom != 0, denom, 1.0), stats.dot)
    delta = (np.maximum(stats.lengths - 1, 0)[:, None] - corpus.ref_bigrams_mat[img]).astype(float)
    penalty = np.e ** (-(delta**2) / (2 * sigma**2))
    per_order = (val * penalty[:, :, None]).sum(axis=1)
    return per_order.mean(axis=1) / corpus.ref_count[img] * 10.0


class CiderD:
    """CIDEr-D reward over a fixed reference corpus, scoring token-id batches at once.

    >>> scorer = CiderD.from_corpus(train_refs, eos_id=0, cache_path="data/coco")  # doctest: +SKIP
    >>> rewards = scorer.score(image_index, sampled_ids)  # [B] like sampled_ids  # doctest: +SKIP
    """

    def __init__(
        self, corpus: RefCorpus, image_ids: Sequence[Hashable] | None = None, *, sigma: float = 6.0
    ):
        self.corpus, self.sigma = corpus, sigma
        ids = list(range(corpus.num_images)) if image_ids is None else list(image_ids)
        if len(ids) != corpus.num_images:
            raise ValueError(f"{len(ids)} image ids for {corpus.num_images} images of references")
        self.image_ids = ids
        self._position = {image_id: i for i, image_id in enumerate(ids)}

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
        sigma: float = 6.0,
        n: int = 4,
    ) -> CiderD:
        """Scorer for ``refs[i]`` = token-id references of image ``image_ids[i]``.

        Document frequencies come from these references (the training split for SCST) and are
        cached at ``cache_path`` (a file, or a directory that gets a keyed file name); a missing
        or stale cache is rebuilt. Sequences are cut at the first ``eos_id``, ``pad_id`` or
        negative id; with ``include_eos`` the EOS counts as a word, as in self-critical.pytorch
        (it rewards finishing a sentence, against "bad endings").
        """
        corpus = RefCorpus.build(
            refs, eos_id=eos_id, pad_id=pad_id, include_eos=include_eos, n=n, cache_path=cache_path
        )
        return cls(corpus, image_ids, sigma=sigma)

    def index_of(self, image_ids: Sequence[Hashable]) -> np.ndarray:
        """Corpus positions of ``image_ids`` (what :meth:`score` takes)."""
        try:
            return np.array([self._position[i] for i in image_ids], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"image id {err.args[0]!r} has no references in this corpus") from None

    def score(self, image_index: Any, candidates: Any) -> np.ndarray | torch.Tensor:
        """CIDEr-D of ``candidates[b]`` ([B, T] ids) against image ``image_index[b]``'s refs.

        Several samples per image: repeat the image's index. Returns float64 scores, a tensor on
        the candidates' device when they are a tensor.
        """
        tokens = as_token_array(candidates)
        stats = self.corpus.match(as_index_array(image_index), tokens)
        return like_input(cider_from_stats(stats, self.corpus, self.sigma), candidates)
