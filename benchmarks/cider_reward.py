"""Vectorised vs per-candidate CIDEr-D rewards on Flickr8k (document frequencies from train).

One SCST reward batch: 50 training images x 5 sampled captions = 250 candidates (real, shuffled,
truncated and repeated-word captions, ending in EOS then padding). The per-candidate baseline is
the straightforward coco-caption / self-critical.pytorch computation (n-gram dicts and tf-idf
vectors per candidate and reference, document frequencies precomputed), as X-modaler runs it.
Runs alternate between the two; the medians are compared. The last line is the headline.

    python benchmarks/cider_reward.py [--data /path/to/flickr8k] [--rounds 15]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from xmodaler_accel.metrics import tokenize_lines
from xmodaler_accel.scoring import CiderD
from xmodaler_accel.scoring import cider_reference as ref

EOS, PAD = 0, 1
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def load_train(data: Path) -> list[list[list[int]]]:
    """Flickr8k train references as token ids (PTB-tokenised like coco-caption)."""
    captions: dict[str, list[str]] = {}
    for line in (data / "Flickr8k.token.txt").read_text(encoding="utf8").splitlines():
        key, caption = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(caption)
    names = [n for n in (data / "Flickr_8k.trainImages.txt").read_text().split() if n in captions]
    words = tokenize_lines([c for n in names for c in captions[n]])
    vocab = {"<eos>": EOS, "<pad>": PAD}
    ids = [[vocab.setdefault(w, len(vocab)) for w in s.split()] for s in words]
    refs, start = [], 0
    for n in names:
        refs.append(ids[start : start + len(captions[n])])
        start += len(captions[n])
    return refs


def sample_batch(
    refs: list, images: int, per_image: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``images * per_image`` candidates shaped like sampled captions: [B], [B, 20]."""
    rng = random.Random(seed)
    index, rows = [], []
    for i in rng.sample(range(len(refs)), images):
        for s in range(per_image):
            own, other = refs[i][s % len(refs[i])], refs[rng.randrange(len(refs))][0]
            cand = [own, other, own[: 2 + s], own[:2] * 3, other[:3] + own[3:]][s % 5]
            index.append(i)
            rows.append((cand + [EOS] + [PAD] * 20)[:20])
    return np.array(index), np.array(rows)


def per_candidate(
    refs_eos: list, df, log_n: float, index: np.ndarray, batch: np.ndarray
) -> np.ndarray:
    """Baseline: one CIDEr-D computation per candidate with Python dicts."""
    return np.array(
        [ref.cider_d(ref.cut(c, EOS, PAD), refs_eos[i], df, log_n) for i, c in zip(index, batch)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not (args.data / "Flickr8k.token.txt").exists():
        sys.exit(f"Flickr8k not found at {args.data} (pass --data)")

    refs = load_train(args.data)
    t0 = time.perf_counter()
    scorer = CiderD.from_corpus(refs, eos_id=EOS, pad_id=PAD)
    build = time.perf_counter() - t0
    refs_eos = [[r + [EOS] for r in image] for image in refs]
    df, log_n = ref.document_frequency(refs_eos)
    index, batch = sample_batch(refs, images=50, per_image=5)
    print(f"train images {len(refs)}, corpus build {build:.2f} s, candidates {len(batch)}")

    fast, slow = scorer.score(index, batch), per_candidate(refs_eos, df, log_n, index, batch)
    print(
        f"max |vectorised - per-candidate| = {np.abs(fast - slow).max():.2e}, mean CIDEr-D {fast.mean():.4f}"
    )

    times: dict[str, list[float]] = {"vectorised": [], "per-candidate": []}
    for _ in range(args.rounds):
        for name, fn in (
            ("vectorised", lambda: scorer.score(index, batch)),
            ("per-candidate", lambda: per_candidate(refs_eos, df, log_n, index, batch)),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, value in med.items():
        print(f"{name:>14}: median {value * 1e3:8.2f} ms per batch over {args.rounds} rounds")
    ratio = med["per-candidate"] / med["vectorised"]
    print(f"ratio {ratio:.1f}x (vectorised vs per-candidate CIDEr-D, {len(batch)} candidates)")


if __name__ == "__main__":
    main()
