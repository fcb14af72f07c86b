"""XE step: encode-once vs X-modaler-style repeated features; cached vs uncached decoding.

X-modaler copies each image's features once per caption before the encoder, so with 5 captions
per image its encoder does 5x the work. Here one Transformer captioner runs both ways on the
same batch (10 images x 5 captions, 50 regions x 2048-d features, captions of 8..15 words,
vocabulary 10k): ours passes `seq_per_img=5` and expands after the encoder; the baseline
repeats features, boxes and masks 5x and passes `seq_per_img=1`. A step is forward,
label-smoothed loss, backward and an Adam step, in train mode. The two alternate and the best
of each is compared (other processes on a shared machine only ever add time; medians are
printed too), at d_model 512 with 6+6 layers and at d_model 128 with 2+2. Decoding times beam
search (beam 3, max length 20) and greedy with the key/value cache against recomputing the whole
prefix every step. The last line is the headline.

    python benchmarks/xe_step.py [--rounds 3] [--small-rounds 8] [--decode-rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from xmodaler_accel.decoding import beam_search, greedy
from xmodaler_accel.models import TransformerCaptioner, label_smoothed_loss

IMAGES, CAPTIONS, REGIONS, FEAT_DIM, VOCAB = 10, 5, 50, 2048, 10_000
SIZES = {
    "d512 6+6": {"d_model": 512, "num_encoder_layers": 6, "num_decoder_layers": 6, "ffn_dim": 2048},
    "d128 2+2": {"d_model": 128, "num_encoder_layers": 2, "num_decoder_layers": 2, "ffn_dim": 512},
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A COCO-sized XE batch shaped like `collate_xe` output."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 16, (IMAGES * CAPTIONS,), generator=gen)
    width = int(lengths.max()) + 1
    words = torch.randint(4, VOCAB, (IMAGES * CAPTIONS, width), generator=gen)
    position = torch.arange(width)[None]
    inputs = torch.where(position <= lengths[:, None], words, 0)
    inputs[:, 0] = 1
    targets = torch.cat([inputs[:, 1:], torch.zeros_like(inputs[:, :1])], dim=1)
    targets[torch.arange(len(lengths)), lengths] = 2
    targets = torch.where(position <= lengths[:, None], targets, -100)
    return {
        "features": torch.randn(IMAGES, REGIONS, FEAT_DIM, generator=gen),
        "boxes": torch.rand(IMAGES, REGIONS, 5, generator=gen),
        "region_mask": torch.ones(IMAGES, REGIONS, dtype=torch.bool),
        "input_ids": inputs,
        "target_ids": targets,
    }


def xe_step(
    model: TransformerCaptioner, optimizer: torch.optim.Optimizer, batch: dict, repeat: bool
) -> None:
    """One XE step; `repeat` copies each image's regions per caption before the encoder."""
    regions = [batch[k] for k in ("features", "boxes", "region_mask")]
    per_image = CAPTIONS
    if repeat:
        regions = [t.repeat_interleave(CAPTIONS, dim=0) for t in regions]
        per_image = 1
    logits = model(*regions, batch["input_ids"], seq_per_img=per_image)
    loss = label_smoothed_loss(logits, batch["target_ids"], smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize() -> None:
    """Wait for queued GPU work so that timings cover it (nothing to wait for on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    runs: dict[str, Callable[[], object]], rounds: int, warmup: bool = True
) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per call of each run, alternating runs (after one warm-up each)."""
    for fn in runs.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (min(values), statistics.median(values)) for name, values in times.items()}


def bench_xe(label: str, rounds: int, batch: dict) -> float:
    """Print encode-once vs repeated-features XE step times for one size; return the ratio."""
    torch.manual_seed(0)
    model = TransformerCaptioner(VOCAB, FEAT_DIM, **SIZES[label]).to(batch["features"].device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = interleaved(
        {
            "encode-once": lambda: xe_step(model, optimizer, batch, repeat=False),
            "repeated": lambda: xe_step(model, optimizer, batch, repeat=True),
        },
        rounds,
    )
    (ours, ours_med), (base, base_med) = times["encode-once"], times["repeated"]
    print(
        f"xe {label}: encode-once {ours:.3f} s/step (median {ours_med:.3f}), X-modaler-style "
        f"repeated features {base:.3f} s/step (median {base_med:.3f}), ratio {base / ours:.2f}x "
        f"(best of {rounds})"
    )
    if max(ours_med / ours, base_med / base) > 1.3:
        print(f"  note: xe {label} timings vary by over 30%: other processes compete for the cores")
    return base / ours


@torch.no_grad()
def bench_decode(rounds: int, batch: dict) -> None:
    """Print cached vs uncached beam search and greedy times for the d512 6+6 model."""
    torch.manual_seed(0)
    model = TransformerCaptioner(VOCAB, FEAT_DIM, **SIZES["d512 6+6"])
    model.to(batch["features"].device).eval()
    enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
    times = interleaved(
        {
            "beam cached": lambda: beam_search(model, enc, beam_size=3, max_len=20),
            "beam uncached": lambda: beam_search(
                model, enc, beam_size=3, max_len=20, use_cache=False
            ),
            "greedy cached": lambda: greedy(model, enc, max_len=20),
            "greedy uncached": lambda: greedy(model, enc, max_len=20, use_cache=False),
        },
        rounds,
        warmup=False,  # the XE benchmark before it has warmed up the process
    )
    for kind, what in (("beam", "beam search, beam 3"), ("greedy", "greedy")):
        cached, uncached = times[f"{kind} cached"][0], times[f"{kind} uncached"][0]
        print(
            f"decode d512 6+6 {what}, max len 20, {IMAGES} images: key/value cache "
            f"{cached:.3f} s, recompute prefix {uncached:.3f} s, ratio {uncached / cached:.2f}x "
            f"(best of {rounds})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed XE steps at d512")
    parser.add_argument("--small-rounds", type=int, default=8, help="timed XE steps at d128")
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (the speed target) or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    batch = {k: v.to(args.device) for k, v in make_batch().items()}
    bench_xe("d128 2+2", args.small_rounds, batch)
    bench_decode(args.decode_rounds, batch)
    ratio = bench_xe("d512 6+6", args.rounds, batch)
    print(
        f"ratio {ratio:.1f}x (encode-once vs X-modaler-style repeated features, XE step, "
        f"d512 6+6, {IMAGES} images x {CAPTIONS} captions, {args.device})"
    )


if __name__ == "__main__":
    main()
