"""Retrieval evaluation cost: single-stream full scoring vs two-stream top-k re-ranking.

On the synthetic scenes (val split, first N images x 5 captions), with the synthetic recipe's
model sizes (random weights: the cost does not depend on them), this times
  - two-stream: embed each image and caption once, similarities in blocks,
  - single-stream full scoring: every (image, caption) pair through the joint encoder,
  - single-stream re-ranking of the two-stream top-k (both directions),
and reports the memory the streamed R@K state holds against the full score matrix. The last line
is the headline: full scoring time / re-ranking time.

    python benchmarks/retrieval_eval.py [--images 100] [--rerank-k 16]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
from datasets import load_from_disk

from xmodaler_accel.config import Config
from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.models.retrieval import build_single_stream, build_two_stream
from xmodaler_accel.retrieval_eval import (
    EvalSettings,
    RetrievalSplit,
    embed_split,
    full_ranks,
    rerank_ranks,
    similarity_ranks,
)

TWO = {
    "hidden": 256,
    "embed_dim": 256,
    "image_layers": 1,
    "text_encoder": "gru",
    "text_layers": 1,
    "heads": 4,
    "dropout": 0.0,
    "loss": "max_violation",
    "margin": 0.2,
    "temperature": 0.07,
}
SINGLE = {
    "bert_dir": "",
    "hidden": 128,
    "layers": 2,
    "heads": 4,
    "intermediate": 512,
    "dropout": 0.0,
    "pooling": "mean",
}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="val images (x5 captions)")
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per forward")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = synthetic_dir()
    tokenizer = load_tokenizer(root / "wordpiece")
    table = load_from_disk(str(root))["val"]
    split = RetrievalSplit.from_table("val", table, tokenizer, max_images=args.images)
    feat_dim = table.features["features"].shape[1]
    sizes = {"feat_dim": feat_dim, "vocab_size": len(tokenizer), "pad_id": 0}
    two = build_two_stream(Config(TWO), **sizes).eval()
    single = build_single_stream(Config(SINGLE), **sizes).eval()
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    settings = EvalSettings(batch_size=args.batch_size, image_chunk=8, rerank_k=args.rerank_k)
    images, texts = split.num_images, split.num_captions
    print(f"split: {images} images x {texts} captions; torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        (img, txt), t_embed = timed(lambda: embed_split(accelerator, two, split, settings))
        _, t_sims = timed(lambda: similarity_ranks(accelerator, img, txt, split, settings))
        print(f"two-stream: embeddings {t_embed:.2f}s + similarities {t_sims:.3f}s")
        (_, full_pairs), t_full = timed(lambda: full_ranks(accelerator, single, split, settings))
        print(f"single-stream full scoring: {full_pairs} pairs in {t_full:.1f}s")
        (_, rerank_pairs), t_rerank = timed(
            lambda: rerank_ranks(accelerator, single, img, txt, split, settings)
        )
        t_rerank += t_embed + t_sims  # the candidates cost their two-stream pass too
        print(
            f"single-stream re-ranking top-{args.rerank_k}: {rerank_pairs} pairs in "
            f"{t_rerank:.1f}s (two-stream pass included)"
        )
        small = replace(settings, similarity_chunk=16)
        _, t_small = timed(lambda: similarity_ranks(accelerator, img, txt, split, small))

    k = max(settings.ks)
    state = 4 * (images + texts) * (k + 1)
    block = 4 * settings.similarity_chunk * texts
    matrix = 4 * images * texts
    print(
        f"memory: streamed R@K state {state / 1e3:.1f} kB + one block {block / 1e3:.1f} kB "
        f"vs full score matrix {matrix / 1e3:.1f} kB (grows as images x captions); "
        f"16-row blocks take {t_small:.3f}s vs {t_sims:.3f}s"
    )
    ratio = t_full / t_rerank
    print(
        f"ratio {ratio:.1f}x (single-stream full scoring {t_full:.1f}s / two-stream top-"
        f"{args.rerank_k} re-ranking {t_rerank:.1f}s, {full_pairs} vs {rerank_pairs} pairs)"
    )


if __name__ == "__main__":
    main()
