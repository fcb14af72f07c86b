"""Integer n-gram keys for batches of token-id sequences, built with array operations.

An n-gram of token ids ``t_1 .. t_n`` becomes one ``uint64`` key, ``sum (t_i + 1) * base**(n-i)``
with wrap-around arithmetic. With ``base = 2**16`` (ids below 65535) the key is exact: distinct
n-grams (n <= 4) never share a key. Larger vocabularies use a large odd base, a 64-bit polynomial
hash whose collisions are possible in principle but vanishingly rare for n <= 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "EXACT_BASE",
    "HASH_BASE",
    "choose_base",
    "count_unique",
    "cut_lengths",
    "ngram_keys",
    "pad_sequences",
]

EXACT_BASE = 1 << 16
HASH_BASE = 0x9E3779B97F4A7C15
MAX_EXACT_ID = EXACT_BASE - 2  # id + 1 must fit in 16 bits


def choose_base(max_id: int, n: int) -> int:
    """Exact packing when every id fits in 16 bits (and n <= 4), else the hash base."""
    return EXACT_BASE if max_id <= MAX_EXACT_ID and n <= 4 else HASH_BASE


def pad_sequences(seqs: Sequence[Sequence[int]], fill: int = -1) -> np.ndarray:
    """Ragged id sequences as an ``[N, T]`` int64 array padded with ``fill`` (one extra column)."""
    width = max((len(s) for s in seqs), default=0) + 1
    out = np.full((len(seqs), width), fill, dtype=np.int64)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if lengths.sum():
        out[np.arange(width)[None, :] < lengths[:, None]] = np.concatenate(
            [np.asarray(s, dtype=np.int64) for s in seqs if len(s)]
        )
    return out


def cut_lengths(
    tokens: np.ndarray, eos_id: int | None, pad_id: int | None, include_eos: bool
) -> np.ndarray:
    """Length of each row up to its first EOS, pad or negative id.

    With ``include_eos`` a row that stops at EOS keeps that EOS as its last token.
    """
    stop = tokens < 0
    if eos_id is not None:
        stop |= tokens == eos_id
    if pad_id is not None:
        stop |= tokens == pad_id
    rows, width = tokens.shape
    has_stop = stop.any(axis=1)
    first = np.where(has_stop, stop.argmax(axis=1), width)
    if include_eos and eos_id is not None and width:
        at_stop = tokens[np.arange(rows), np.minimum(first, width - 1)]
        first = first + (has_stop & (at_stop == eos_id))
    return first.astype(np.int64)


def ngram_keys(
    tokens: np.ndarray, lengths: np.ndarray, n: int, base: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 1..n-gram inside each row's length: (row, uint64 key, order 0..n-1).

    Rows come out non-decreasing. Keys of different orders never collide: exact keys fall in
    disjoint ranges (a k-gram key is at least ``base**(k-1)``), hashed ones start from a seed.
    """
    shifted = (tokens + 1).astype(np.uint64)
    mult = np.uint64(base)
    keys = shifted + (np.uint64(0) if base == EXACT_BASE else mult)
    blocks, masks, orders = [], [], []
    for k in range(n):
        span = tokens.shape[1] - k
        if span <= 0:
            break
        if k:
            keys = keys[:, :-1] * mult + shifted[:, k:]
        blocks.append(keys)
        masks.append(np.arange(span)[None, :] + k + 1 <= lengths[:, None])
        orders.append(np.full(span, k, dtype=np.int64))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    valid = np.concatenate(masks, axis=1)
    rows, cols = np.nonzero(valid)
    return (
        rows.astype(np.int64),
        np.concatenate(blocks, axis=1)[valid],
        np.concatenate(orders)[cols],
    )


def count_unique(
    rows: np.ndarray, keys: np.ndarray, *payload: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Distinct (row, key) pairs sorted by key then row, how often each occurs, and ``payload``
    arrays taken at each pair's first occurrence.

    Sorted keys make later ``searchsorted`` calls several times faster. When ``rows`` is already
    non-decreasing (as :func:`ngram_keys` returns it) a stable sort on the keys alone suffices.
    """
    if len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all()):
        order = np.argsort(keys, kind="stable")
    else:
        order = np.lexsort((rows, keys))
    rows, keys = rows[order], keys[order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(rows)))
    return (rows[starts], keys[starts], counts, *(p[order[starts]] for p in payload))
