"""Captioning generation and training steps, the current decoders against the previous ones.

The previous decoders (kept below as the baseline, measured in the same run) grew the Transformer's
key/value cache by concatenation and read "have all rows ended?" back to the host after every
token. The current ones write into a cache preallocated for `max_len` and read that every few
tokens on an accelerator (`decoding.stop_check_every`); both give the same tokens (checked here).

- Beam search (beam 3, max length 20) over a batch of images: images/s.
- SCST step (forward, backward, Adam; samples per image + greedy baseline, CIDEr-D reward on a
  random reference corpus): images/s and peak GPU memory.
- XE step on CUDA: fp32 against bf16 autocast.

On CUDA: the COCO-size Transformer (d512 6+6, 50 regions of 2048-d, vocab 10,200) in bf16, 50
images x 5 samples. On the CPU (`--device cpu`, the default without CUDA): d128 2+2, 8 images,
fp32, one thread; the current decoders must be no slower there.

    python benchmarks/gpu_captioning.py [--device cuda|cpu] [--repeats 9] [--compile MODE]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from xmodaler_accel import decoding
from xmodaler_accel.decoding import beam_search
from xmodaler_accel.models import build_captioner, label_smoothed_loss
from xmodaler_accel.models.transformer import merge_heads, split_heads
from xmodaler_accel.scoring import RewardScorer
from xmodaler_accel.tasks.captioning import scst_step

COCO = {"vocab": 10_200, "regions": 50, "feat": 2048, "images": 50, "model": {}}
SMALL = {
    "vocab": 1_000,
    "regions": 20,
    "feat": 256,
    "images": 8,
    "model": {
        "d_model": 128,
        "num_heads": 4,
        "ffn_dim": 512,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
    },
}
SAMPLES, MAX_LEN = 5, 20
COMPILE_MODE = ""  # --compile


class PreviousStepper:
    """The previous Transformer decoding step: keys/values grown by `torch.cat` every token."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def init_state(self, enc):
        empty = enc.cache[0].new_zeros(enc.rows, self.model.num_heads, 0, self.model.head_dim)
        return (empty,) * (2 * len(self.model.decoder_layers))

    def decode_step(self, enc, state, tokens):
        model, cache = self.model, []
        x = model.token_embed(tokens[:, None], start=state[0].shape[2])
        for i, layer in enumerate(model.decoder_layers):
            attn = layer.self_attn
            q, k, v = (split_heads(t, attn.heads) for t in attn.qkv(x).chunk(3, dim=-1))
            k, v = torch.cat([state[2 * i], k], dim=2), torch.cat([state[2 * i + 1], v], dim=2)
            p = attn.dropout if attn.training else 0.0
            out = attn.out(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p)))
            x = layer._rest(out, x, model._memory_kv(enc, i), enc.mask, enc.group)
            cache += [k, v]
        logits = model.predictor(model.pred_dropout(x[:, 0]))
        return logits.float().log_softmax(-1), tuple(cache)

    def reorder_state(self, state, index):
        return tuple(t.index_select(0, index) for t in state)


@contextlib.contextmanager
def previous_decoders():
    """Decoding as it was: the concatenating cache and a host read after every token."""
    stepper, every = decoding._stepper, decoding.stop_check_every
    decoding._stepper = lambda model, use_cache: PreviousStepper(model)
    decoding.stop_check_every = lambda device: 1
    try:
        yield
    finally:
        decoding._stepper, decoding.stop_check_every = stepper, every


def build(size: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_captioner(
        "transformer",
        vocab_size=size["vocab"],
        feat_dim=size["feat"],
        max_len=MAX_LEN,
        **size["model"],
    )
    model = model.to(device)
    if COMPILE_MODE:  # the current step compiled; the previous decoders call their own
        model.decode_step = torch.compile(model.decode_step, mode=COMPILE_MODE, fullgraph=True)
    return model


def images(size: dict, device: torch.device) -> dict[str, torch.Tensor]:
    n = size["images"]
    return {
        "features": torch.randn(n, size["regions"], size["feat"], device=device),
        "boxes": torch.rand(n, size["regions"], 5, device=device),
        "region_mask": torch.ones(n, size["regions"], dtype=torch.bool, device=device),
        "index": torch.arange(n, device=device),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compared(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn` with the previous and with the current decoders, the two taking
    turns (a shared machine's drift then affects both alike)."""

    def previous():
        with previous_decoders():
            fn()

    before, after = [], []
    for _ in range(repeats):
        before.append(timed(previous, device, 1))
        after.append(timed(fn, device, 1))
    return statistics.median(before), statistics.median(after)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def beam_seconds(size, device, repeats) -> tuple[float, float, bool]:
    model, batch = build(size, device).eval(), images(size, device)

    @torch.no_grad()
    def decode():
        with autocast(device):
            enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
            return beam_search(model, enc, beam_size=3, max_len=MAX_LEN).sequences

    with previous_decoders():
        before_tokens = decode()
    same = torch.equal(before_tokens, decode())
    return (*compared(decode, device, repeats), same)


def scst_seconds(size, device, repeats) -> tuple[float, float, bool]:
    model = build(size, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    refs = [
        [torch.randint(4, size["vocab"], (12,), generator=gen).tolist() for _ in range(5)]
        for _ in range(size["images"])
    ]
    scorer = RewardScorer.from_corpus(refs, eos_id=2, pad_id=0)
    batch = images(size, device)
    engine = SimpleNamespace(
        model=model, unwrapped_model=model, gathered_model=lambda: nullcontext(model), scalars={}
    )

    def step():
        with autocast(device):
            out = scst_step(
                engine, batch, scorer=scorer, samples_per_image=SAMPLES, max_len=MAX_LEN
            )
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out

    def samples_of_a_fixed_seed() -> torch.Tensor:
        torch.manual_seed(1)
        with torch.no_grad(), autocast(device):
            enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
            tokens = decoding.sample(model, enc, n=SAMPLES, max_len=MAX_LEN).tokens
        return tokens.cpu()

    with previous_decoders():
        before_draw = samples_of_a_fixed_seed()
    same = torch.equal(before_draw, samples_of_a_fixed_seed())  # before any step moves weights
    before, _ = compared(step, device, 1)  # warm both up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return (*compared(step, device, repeats), same)


def xe_step_seconds(device, dtype) -> float:
    model = build(COCO, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = images(COCO, device)
    ids = torch.randint(4, COCO["vocab"], (COCO["images"] * 5, 16), device=device)

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits = model(
                batch["features"], batch["boxes"], batch["region_mask"], ids, seq_per_img=5
            )
            loss = label_smoothed_loss(logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--compile",
        default="",
        help="torch.compile mode for the current decoding step (e.g. default, reduce-overhead)",
    )
    args = parser.parse_args()
    global COMPILE_MODE
    COMPILE_MODE = args.compile
    device = torch.device(args.device)
    if COMPILE_MODE and device.type == "cpu":
        parser.error("--compile needs an accelerator: the CPU's cache grows every step")
    size = COCO if device.type == "cuda" else SMALL
    if device.type == "cpu":
        torch.set_num_threads(1)
        print(f"cpu, 1 thread, torch {torch.__version__}; d128 2+2, {size['images']} images")
    else:
        print(torch.cuda.get_device_name(device), "torch", torch.__version__, "; d512 6+6, bf16")
        fp32, bf16 = xe_step_seconds(device, None), xe_step_seconds(device, torch.bfloat16)
        print(
            f"XE step, 50 images x 5 captions: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms"
        )
    n = size["images"]
    before, after, same = beam_seconds(size, device, args.repeats)
    print(
        f"beam 3, {n} images: previous {n / before:.1f} images/s, current {n / after:.1f} "
        f"images/s ({before / after:.2f}x), same sequences: {same}"
    )
    before, after, same = scst_seconds(size, device, args.repeats)
    peak = ""
    if device.type == "cuda":
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(
        f"SCST step, {n} images x {SAMPLES} samples + greedy baseline: previous "
        f"{n / before:.1f} images/s, current {n / after:.1f} images/s{peak}, same samples: {same}"
    )
    print(
        f"ratio {before / after:.2f}x (SCST step images/s, current vs previous decoders, "
        f"{device.type}, {n} images x {SAMPLES} samples)"
    )


if __name__ == "__main__":
    main()
