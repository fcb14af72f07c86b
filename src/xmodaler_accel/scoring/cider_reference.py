"""Per-candidate CIDEr-D and BLEU with Python dicts: the reference the vectorised scorers match.

Written the straightforward way coco-caption's ``CiderScorer`` / ``BleuScorer`` (and
self-critical.pytorch's ``CiderD``) compute one candidate: count n-grams, build tf-idf vectors of
the candidate and of each reference, clipped cosine similarity with the Gaussian length penalty.
Slow on purpose; used by tests and as the benchmark's baseline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

__all__ = ["bleu_sentence", "cider_d", "cut", "document_frequency", "ngram_counts"]

Token = Hashable


def cut(
    seq: Sequence[int], eos_id: int | None, pad_id: int | None = None, include_eos: bool = True
) -> list[int]:
    """Tokens before the first EOS, pad or negative id; the EOS itself kept if ``include_eos``."""
    out: list[int] = []
    for tok in seq:
        tok = int(tok)
        if tok == eos_id:
            if include_eos:
                out.append(tok)
            break
        if tok == pad_id or tok < 0:
            break
        out.append(tok)
    return out


def ngram_counts(words: Sequence[Token], n: int = 4) -> Counter:
    """Counts of every 1..n-gram (as tuples) of ``words``."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def document_frequency(
    refs_per_image: Sequence[Sequence[Sequence[Token]]], n: int = 4
) -> tuple[Counter, float]:
    """Number of images whose references contain each n-gram, and log(number of images)."""
    df: Counter = Counter()
    for refs in refs_per_image:
        df.update({g for ref in refs for g in ngram_counts(ref, n)})
    return df, math.log(float(len(refs_per_image)))


def _tfidf(counts: Counter, df: Counter, log_n: float, n: int) -> tuple[list, list, int]:
    """tf-idf vectors per order, their norms, and the number of bigrams (CIDEr-D's length)."""
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    for gram, tf in counts.items():
        k = len(gram) - 1
        vec[k][gram] = float(tf) * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
        norm[k] += vec[k][gram] ** 2
    bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, [math.sqrt(x) for x in norm], bigrams


def cider_d(
    candidate: Sequence[Token],
    refs: Sequence[Sequence[Token]],
    df: Counter,
    log_n: float,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """CIDEr-D of one candidate against its references, with corpus frequencies ``df``."""
    vec, norm, length = _tfidf(ngram_counts(candidate, n), df, log_n, n)
    total = [0.0] * n
    for ref in refs:
        vec_r, norm_r, length_r = _tfidf(ngram_counts(ref, n), df, log_n, n)
        penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma**2))
        for k in range(n):
            val = sum(
                min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items()
            )
            if norm[k] != 0 and norm_r[k] != 0:
                val /= norm[k] * norm_r[k]
            total[k] += val * penalty
    return sum(total) / n / len(refs) * 10.0


def bleu_sentence(
    candidate: Sequence[Token], refs: Sequence[Sequence[Token]], n: int = 4
) -> list[float]:
    """coco-caption's per-sentence BLEU-1..n ("closest" reference length, its smoothing)."""
    small, tiny = 1e-9, 1e-15
    counts = ngram_counts(candidate, n)
    max_ref: Counter = Counter()
    for ref in refs:
        for gram, c in ngram_counts(ref, n).items():
            max_ref[gram] = max(max_ref[gram], c)
    test_len = len(candidate)
    ref_len = min((abs(len(r) - test_len), len(r)) for r in refs)[1]
    correct = [0] * n
    for gram, c in counts.items():
        correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores, bleu = [], 1.0
    for k in range(n):
        bleu *= (correct[k] + tiny) / (max(0, test_len - k) + small)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores
