"""Reference corpus for vectorised CIDEr-D and BLEU: document frequencies and n-gram tables.

Built once from the training references (token ids per image). Every 1..n-gram is an integer
key (:mod:`.ngrams`); the corpus keeps

* the document frequencies: sorted keys with, for each, the number of images whose references
  contain it (coco-caption's ``compute_doc_freq``) and its order; cached on disk (:mod:`.cache`);
* a table of (image, n-gram) rows, sorted, each pointing at the references of that image that
  contain the n-gram, with their term frequencies.

:meth:`RefCorpus.match` joins a whole batch of candidates, all orders at once, against that
table with ``searchsorted`` and ``bincount``: no Python loop over candidates or n-grams.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .cache import DocFrequencies, corpus_key, load_df, resolve_cache_file, save_df
from .ngrams import (
    EXACT_BASE,
    MAX_EXACT_ID,
    choose_base,
    count_unique,
    cut_lengths,
    ngram_keys,
    pad_sequences,
)

__all__ = ["CandidateStats", "RefCorpus"]


@dataclass(frozen=True)
class CandidateStats:
    """What CIDEr-D and BLEU need about a batch of candidates, per n-gram order."""

    image_index: np.ndarray  # [B]
    lengths: np.ndarray  # [B] tokens kept (with EOS when included)
    dot: np.ndarray  # [B, R, n] sum over shared n-grams of min(w_cand, w_ref) * w_ref
    cand_norm: np.ndarray  # [B, n] norm of the candidate's tf-idf vector
    correct: np.ndarray  # [B, n] clipped n-gram matches (BLEU)


class RefCorpus:
    """Training references as integer n-gram tables; see the module docstring."""

    def __init__(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        refs_per_image: np.ndarray,
        *,
        n: int,
        base: int,
        df: DocFrequencies | None = None,
        settings: dict | None = None,
    ) -> None:
        self.n, self.base, self.settings = n, base, dict(settings or {})
        self.num_images = len(refs_per_image)
        self.ref_count = refs_per_image.astype(np.int64)
        offset = np.concatenate([[0], np.cumsum(self.ref_count)[:-1]]).astype(np.int64)
        self.ref_image = np.repeat(np.arange(self.num_images), self.ref_count)
        self.ref_slot = np.arange(len(lengths)) - offset[self.ref_image]
        self.max_refs = int(self.ref_count.max(initial=0))
        refs, keys, tf, order = count_unique(*ngram_keys(tokens, lengths, n, base))
        self.df = df if df is not None else self._doc_frequencies(refs, keys, order)
        self.df_keys, self.df_counts, self.df_order = self.df[0], self.df[1], self.df[2]
        self.log_n = float(np.log(float(self.df[3])))
        self.idf = self.log_n - np.log(np.maximum(1.0, self.df_counts.astype(np.float64)))
        self._build_rows(refs, keys, tf)
        self.ref_len_mat = self._per_slot(lengths)
        self.ref_bigrams_mat = self._per_slot(np.maximum(lengths - 1, 0))
        self.ref_norm_mat = self._ref_norms()

    @classmethod
    def build(
        cls,
        refs: Sequence[Sequence[Sequence[int]]],
        *,
        eos_id: int | None,
        pad_id: int | None = None,
        include_eos: bool = True,
        n: int = 4,
        cache_path: str | os.PathLike | None = None,
    ) -> RefCorpus:
        """Corpus from ``refs[image][k]`` token ids, with frequencies cached at ``cache_path``.

        Each reference is cut at its first EOS, pad or negative id; with ``include_eos`` an EOS
        is then appended to every reference (self-critical.pytorch's convention).
        """
        counts = np.array([len(r) for r in refs], dtype=np.int64)
        if len(counts) == 0 or (counts == 0).any():
            bad = int(np.flatnonzero(counts == 0)[0]) if len(counts) else "any"
            raise ValueError(f"every image needs at least one reference; image {bad} has none")
        tokens = pad_sequences([seq for image_refs in refs for seq in image_refs])
        lengths = cut_lengths(tokens, eos_id, pad_id, include_eos=False)
        if include_eos:
            if eos_id is None:
                raise ValueError("include_eos=True needs an eos_id")
            tokens[np.arange(len(tokens)), lengths] = eos_id
            lengths = lengths + 1
        max_id = int(max(tokens.max(initial=0), eos_id or 0, pad_id or 0))
        base = choose_base(max_id, n)
        settings = dict(n=n, base=base, eos_id=eos_id, pad_id=pad_id, include_eos=include_eos)
        df = None
        if cache_path is not None:
            key = corpus_key(tokens, lengths, counts, settings)
            path = resolve_cache_file(cache_path, key)
            df = load_df(path, key, n)
        corpus = cls(tokens, lengths, counts, n=n, base=base, df=df, settings=settings)
        if cache_path is not None and df is None:
            save_df(path, key, corpus.df, n)
        return corpus

    def _doc_frequencies(
        self, refs: np.ndarray, keys: np.ndarray, order: np.ndarray
    ) -> DocFrequencies:
        """coco-caption's document frequency: in how many images' references each n-gram is."""
        _, image_keys, _, image_order = count_unique(self.ref_image[refs], keys, order)
        new = np.ones(len(image_keys), dtype=bool)
        new[1:] = image_keys[1:] != image_keys[:-1]
        starts = np.flatnonzero(new)
        counts = np.diff(np.append(starts, len(image_keys))).astype(np.int64)
        return image_keys[starts], counts, image_order[starts], self.num_images

    def _build_rows(self, refs: np.ndarray, keys: np.ndarray, tf: np.ndarray) -> None:
        """Group the references' n-grams by (image, n-gram): ``image * G + gram``, sorted."""
        gram = np.searchsorted(self.df_keys, keys)
        if len(keys) and not np.array_equal(
            self.df_keys[np.minimum(gram, len(self.df_keys) - 1)], keys
        ):
            raise ValueError("cached document frequencies do not cover the references")
        code = self.ref_image[refs] * max(len(self.df_keys), 1) + gram
        order = np.lexsort((self.ref_slot[refs], code))
        code, gram, tf = code[order], gram[order], tf[order]
        new = np.ones(len(code), dtype=bool)
        new[1:] = code[1:] != code[:-1]
        starts = np.flatnonzero(new)
        self.row_code = code[starts]  # [rows] image * G + gram
        self.row_start = np.append(starts, len(code)).astype(np.int64)  # [rows + 1]
        self.row_gram = gram[starts]
        self.row_max_tf = np.maximum.reduceat(tf, starts) if len(starts) else tf  # BLEU clipping
        self.entry_slot = self.ref_slot[refs][order]  # [entries] which reference of the image
        self.entry_tf = tf.astype(np.float64)  # [entries] count in that reference

    def _per_slot(self, values: np.ndarray) -> np.ndarray:
        """Per-reference values as an ``[images, max_refs]`` array (0 where no reference)."""
        out = np.zeros((self.num_images, max(self.max_refs, 1)), dtype=np.int64)
        out[self.ref_image, self.ref_slot] = values
        return out

    def _ref_norms(self) -> np.ndarray:
        """``[images, max_refs, n]`` norms of the references' tf-idf vectors per order."""
        count = np.diff(self.row_start)
        gram = np.repeat(self.row_gram, count)
        weight = self.entry_tf * self.idf[gram]
        images = np.repeat(self.row_code // max(len(self.df_keys), 1), count)
        flat = (images * self.ref_len_mat.shape[1] + self.entry_slot) * self.n + self.df_order[gram]
        squares = np.bincount(flat, weight * weight, minlength=self.ref_len_mat.size * self.n)
        return np.sqrt(squares).reshape(*self.ref_len_mat.shape, self.n)

    def candidate_lengths(self, tokens: np.ndarray) -> np.ndarray:
        """Where each candidate row ends, by this corpus' EOS/pad settings."""
        s = self.settings
        return cut_lengths(tokens, s["eos_id"], s["pad_id"], s["include_eos"])

    def match(self, image_index: np.ndarray, tokens: np.ndarray) -> CandidateStats:
        """Join candidates ``tokens[b]`` (for image ``image_index[b]``) against the references."""
        if len(image_index) != len(tokens):
            raise ValueError(f"{len(image_index)} image indices for {len(tokens)} candidates")
        if len(image_index) and (image_index.min() < 0 or image_index.max() >= self.num_images):
            raise ValueError(f"image index out of range [0, {self.num_images})")
        lengths = self.candidate_lengths(tokens)
        self._check_ids(tokens, lengths)
        batch, n, slots = len(tokens), self.n, max(self.max_refs, 1)
        rows, keys, tf, order = count_unique(*ngram_keys(tokens, lengths, n, self.base))
        weight, row = self._lookup(image_index[rows], keys, tf)
        cell = rows * n + order
        norm = np.sqrt(np.bincount(cell, weight * weight, minlength=batch * n)).reshape(batch, n)
        hit = row >= 0
        rows, cell, weight, tf, row = rows[hit], cell[hit], weight[hit], tf[hit], row[hit]
        clipped = np.minimum(tf, self.row_max_tf[row])
        correct = np.bincount(cell, clipped, minlength=batch * n).reshape(batch, n)
        dot = self._clipped_dot(rows, order[hit], weight, row, batch)
        return CandidateStats(image_index, lengths, dot.reshape(batch, slots, n), norm, correct)

    def _lookup(
        self, images: np.ndarray, keys: np.ndarray, tf: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate n-gram weights tf * idf, and the table row of (image, n-gram) or -1."""
        num = len(self.df_keys)
        if num == 0:
            return tf * self.log_n, np.full(len(keys), -1, dtype=np.int64)
        gram = np.minimum(np.searchsorted(self.df_keys, keys), num - 1)
        known = self.df_keys[gram] == keys
        df = np.where(known, self.df_counts[gram], 0).astype(np.float64)
        weight = tf.astype(np.float64) * (self.log_n - np.log(np.maximum(1.0, df)))
        code = images * num + gram
        sort = np.argsort(code)  # sorted needles make searchsorted several times faster
        row = np.empty_like(sort)
        row[sort] = np.searchsorted(self.row_code, code[sort])
        row = np.minimum(row, len(self.row_code) - 1)
        return weight, np.where(known & (self.row_code[row] == code), row, -1)

    def _clipped_dot(
        self, rows: np.ndarray, order: np.ndarray, weight: np.ndarray, row: np.ndarray, batch: int
    ) -> np.ndarray:
        """Sum of min(w_cand, w_ref) * w_ref per (candidate, reference slot, order)."""
        start = self.row_start[row]
        count = self.row_start[row + 1] - start
        first = np.repeat(np.cumsum(count) - count, count)
        entry = np.repeat(start, count) + (np.arange(int(count.sum())) - first)
        w_ref = self.entry_tf[entry] * np.repeat(self.idf[self.row_gram[row]], count)
        contrib = np.minimum(np.repeat(weight, count), w_ref) * w_ref
        slots = max(self.max_refs, 1)
        flat = (np.repeat(rows, count) * slots + self.entry_slot[entry]) * self.n + np.repeat(
            order, count
        )
        return np.bincount(flat, contrib, minlength=batch * slots * self.n)

    def _check_ids(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Exact n-gram keys need every kept id below 65535."""
        if self.base != EXACT_BASE or tokens.size == 0:
            return
        kept = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        if kept.any() and tokens[kept].max() > MAX_EXACT_ID:
            raise ValueError(
                f"candidate token id {int(tokens[kept].max())} exceeds {MAX_EXACT_ID}, the largest "
                "id of this corpus' exact n-gram keys; build the corpus with the full vocabulary"
            )
