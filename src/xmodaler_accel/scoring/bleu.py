"""coco-caption BLEU from vectorised n-gram statistics: per sentence and over a corpus.

Same arithmetic as coco-caption's ``BleuScorer.compute_score(option="closest")``: clipped n-gram
matches, the reference length closest to the candidate's (ties to the shorter), numerator
smoothing ``tiny = 1e-15`` and denominator smoothing ``small = 1e-9``, brevity penalty
``exp(1 - r/c)`` when the candidate is shorter.
"""

from __future__ import annotations

import math

import numpy as np

from .corpus import CandidateStats, RefCorpus

__all__ = ["BleuCounts", "bleu_counts", "corpus_bleu", "sentence_bleu"]

SMALL = 1e-9  # added to denominators (coco-caption's name)
TINY = 1e-15  # added to numerators (coco-caption's name)

# testlen [B], closest reflen [B], guess [B, n], correct [B, n]
BleuCounts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def bleu_counts(stats: CandidateStats, corpus: RefCorpus) -> BleuCounts:
    """Per-candidate lengths and n-gram counts that BLEU is made of."""
    test_len = stats.lengths
    ref_lens = corpus.ref_len_mat[stats.image_index]
    present = np.arange(ref_lens.shape[1])[None, :] < corpus.ref_count[stats.image_index, None]
    scale = int(ref_lens.max(initial=0)) + 1  # orders by distance first, then by length
    cost = np.abs(ref_lens - test_len[:, None]) * scale + ref_lens
    cost = np.where(present, cost, np.iinfo(np.int64).max)
    closest = ref_lens[np.arange(len(test_len)), cost.argmin(axis=1)]
    orders = np.arange(corpus.n)[None, :]
    guess = np.maximum(0, test_len[:, None] - orders)
    return test_len, closest, guess, stats.correct


def sentence_bleu(counts: BleuCounts) -> np.ndarray:
    """``[B, n]`` BLEU-1..n of each candidate on its own."""
    test_len, ref_len, guess, correct = (np.asarray(x, dtype=np.float64) for x in counts)
    ratio_k = (correct + TINY) / (guess + SMALL)
    scores = np.cumprod(ratio_k, axis=1) ** (1.0 / np.arange(1, ratio_k.shape[1] + 1))
    ratio = (test_len + TINY) / (ref_len + SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)
    return scores * brevity[:, None]


def corpus_bleu(counts: BleuCounts) -> list[float]:
    """Corpus BLEU-1..n from summed counts (coco-caption's headline numbers)."""
    test_len, ref_len, guess, correct = counts
    total_test, total_ref = int(test_len.sum()), int(ref_len.sum())
    scores, bleu = [], 1.0
    for k in range(guess.shape[1]):
        bleu *= float(int(correct[:, k].sum()) + TINY) / (int(guess[:, k].sum()) + SMALL)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (total_test + TINY) / (total_ref + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores
