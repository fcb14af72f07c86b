"""Beam search with the key/value cache against recomputing the whole prefix every step.

Transformer captioner at COCO sizes (d_model 512, 6+6 layers, vocabulary 10,200, 50 regions of
2048-d), beam 3, max length 20, 50 images per batch, eval mode. Both paths must return the same
sequences; the two alternate and the best of each is compared (a shared machine only adds time).

    .venv/bin/python benchmarks/beam_search.py [--rounds 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from xmodaler_accel.decoding import beam_search
from xmodaler_accel.models import build_captioner

IMAGES, REGIONS, FEAT_DIM, VOCAB = 50, 50, 2048, 10_200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_captioner("transformer", vocab_size=VOCAB, feat_dim=FEAT_DIM).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(IMAGES, REGIONS, FEAT_DIM, generator=gen).to(device)
    boxes = torch.rand(IMAGES, REGIONS, 5, generator=gen).to(device)
    mask = torch.ones(IMAGES, REGIONS, dtype=torch.bool, device=device)

    @torch.no_grad()
    def decode(use_cache: bool) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        enc = model.encode(features, boxes, mask)
        out = beam_search(model, enc, beam_size=3, max_len=20, use_cache=use_cache).sequences
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    best = {True: float("inf"), False: float("inf")}
    outputs = {}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            outputs[use_cache], seconds = decode(use_cache)
            best[use_cache] = min(best[use_cache], seconds)
    same = torch.equal(outputs[True], outputs[False])
    for use_cache, label in ((True, "key/value cache"), (False, "recompute prefix")):
        print(
            f"{label:>16}: {best[use_cache]:.2f} s per batch, {IMAGES / best[use_cache]:.1f} images/s"
        )
    print(f"same sequences: {same}")
    print(
        f"ratio {best[False] / best[True]:.2f}x (beam search, key/value cache vs recompute, beam 3, "
        f"max len 20, {IMAGES} images, d512 6+6, {args.device}; {IMAGES / best[True]:.1f} images/s)"
    )


if __name__ == "__main__":
    main()
