"""Captioning on a GPU at COCO sizes (run where CUDA is available):

- XE step (forward, backward, Adam) of the d512 6+6 Transformer, 10 images x 5 captions, 50
  regions of 2048-d, vocab 10,200: fp32 and bf16 autocast.
- SCST step (greedy baseline, CIDEr-D reward on random reference corpora) at 16 images with 1, 5
  and 10 samples per image: time and peak GPU memory.
- Beam search (beam 3, max length 20, 50 images): cached vs recomputing the prefix, images/s.

    python benchmarks/gpu_captioning.py
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from xmodaler_accel.decoding import beam_search
from xmodaler_accel.models import build_captioner, label_smoothed_loss
from xmodaler_accel.scoring import RewardScorer
from xmodaler_accel.tasks.captioning import scst_step

VOCAB, REGIONS, FEAT, LEN = 10200, 50, 2048, 16


def coco_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_captioner("transformer", vocab_size=VOCAB, feat_dim=FEAT, max_len=20).cuda()


def images(n: int) -> dict[str, torch.Tensor]:
    return {
        "features": torch.randn(n, REGIONS, FEAT, device="cuda"),
        "boxes": torch.rand(n, REGIONS, 5, device="cuda"),
        "region_mask": torch.ones(n, REGIONS, dtype=torch.bool, device="cuda"),
        "index": torch.arange(n, device="cuda"),
    }


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def xe_step_time(dtype: torch.dtype | None) -> float:
    model = coco_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = images(10)
    ids = torch.randint(4, VOCAB, (50, LEN), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits = model(
                batch["features"], batch["boxes"], batch["region_mask"], ids, seq_per_img=5
            )
            loss = label_smoothed_loss(logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step)


def scst_figures(samples: int) -> tuple[float, float]:
    model = coco_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    refs = [
        [torch.randint(4, VOCAB, (12,), generator=gen).tolist() for _ in range(5)]
        for _ in range(16)
    ]
    scorer = RewardScorer.from_corpus(refs, eos_id=2, pad_id=0)
    batch = images(16)
    engine = SimpleNamespace(
        model=model, unwrapped_model=model, gathered_model=lambda: nullcontext(model), scalars={}
    )

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = scst_step(engine, batch, scorer=scorer, samples_per_image=samples, max_len=20)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    step()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, repeats=5)
    return seconds, torch.cuda.max_memory_allocated() / 2**30


def beam_figures() -> tuple[float, float]:
    model = coco_model().eval()
    batch = images(50)

    @torch.no_grad()
    def decode(use_cache: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
            return beam_search(model, enc, beam_size=3, max_len=20, use_cache=use_cache).sequences

    same = torch.equal(decode(True), decode(False))
    cached, uncached = timed(lambda: decode(True), 5), timed(lambda: decode(False), 5)
    print(
        f"beam 3, 50 images, bf16: cached {50 / cached:.0f} images/s, recompute "
        f"{50 / uncached:.0f} images/s, same sequences: {same}"
    )
    return cached, uncached


def main() -> None:
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    fp32, bf16 = xe_step_time(None), xe_step_time(torch.bfloat16)
    print(
        f"XE step d512 6+6, 10 images x 5 captions: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms"
    )
    for samples in (1, 5, 10):
        seconds, peak = scst_figures(samples)
        print(
            f"SCST step bf16, 16 images x {samples:2d} samples + greedy baseline: "
            f"{seconds * 1e3:.1f} ms, peak GPU memory {peak:.2f} GiB"
        )
    cached, uncached = beam_figures()
    print(
        f"ratio {uncached / cached:.2f}x (GPU beam search, key/value cache vs recompute, beam 3, "
        f"50 images, d512 6+6)"
    )


if __name__ == "__main__":
    main()
