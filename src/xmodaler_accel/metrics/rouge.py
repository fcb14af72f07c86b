"""ROUGE-L as coco-caption computes it, with a bit-parallel longest common subsequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BETA", "lcs_length", "rouge_l", "rouge_l_sentence"]

BETA = 1.2  # coco-caption's recall weight


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Hyyro's bit-vector algorithm: one big-integer add/or/and per token of ``b`` instead of a
    ``len(a) x len(b)`` table.
    """
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_sentence(candidate: str, refs: Sequence[str]) -> float:
    """ROUGE-L F-measure of one tokenised candidate: best precision and best recall over refs.

    Tokens come from ``str.split(" ")`` as in coco-caption, so an empty caption is one empty
    token (which only an empty reference matches).
    """
    cand = candidate.split(" ")
    prec, rec = [], []
    for ref in refs:
        tokens = ref.split(" ")
        lcs = lcs_length(tokens, cand)
        prec.append(lcs / float(len(cand)))
        rec.append(lcs / float(len(tokens)))
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + BETA**2) * p * r) / float(r + BETA**2 * p)


def rouge_l(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """Mean ROUGE-L over images and per-image scores (``res[k]`` a string, ``gts[k]`` a list)."""
    scores = np.array([rouge_l_sentence(res[k], gts[k]) for k in gts])
    return float(np.mean(scores)), scores
