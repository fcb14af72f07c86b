"""Retrieval evaluation cost on a 1000-image x 5000-caption synthetic split.

With the synthetic recipe's model sizes (random weights: the cost does not depend on them):
  - single-stream all-pairs scoring, pairs/s with `clip_inputs` (each block trimmed to its longest
    caption and most regions) and without it (every pair padded to `max_length` tokens and
    `max_feat_num` regions, as a fixed-size data pipeline gives). 5M pairs take too long on a CPU,
    so both are timed on the first `--sample-images` images against all 5000 captions (the cost
    per pair does not depend on which images) and the full split's time is projected;
  - two-stream: embed every image and caption once, similarities in blocks, R@K;
  - single-stream re-ranking of the two-stream top-k (both directions), over the whole split.
The last line is the headline: pairs/s with `clip_inputs` / pairs/s without.

    python benchmarks/retrieval_eval.py [--images 1000] [--sample-images 16] [--rerank-k 16]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from datasets import load_from_disk

from xmodaler_accel.config import Config
from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.models.retrieval import build_single_stream, build_two_stream
from xmodaler_accel.tasks.retrieval.evaluation import (
    EvalSettings,
    RetrievalSplit,
    embed_split,
    rerank_ranks,
    similarity_ranks,
)
from xmodaler_accel.tasks.retrieval.steps import clip_inputs

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
MAX_LENGTH, MAX_FEAT_NUM = 40, 50  # recipes/synthetic_retrieval.yaml


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dimension 1 of `x` with zeros to `length`."""
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad)


@torch.no_grad()
def score_all_pairs(model, split: RetrievalSplit, images: int, settings, clip: bool) -> int:
    """Score the first `images` images against every caption, blocked as `full_ranks` does.

    clip=False pads every block to the fixed sizes and scores it without `clip_inputs`.
    """
    per_block = max(1, settings.batch_size // settings.image_chunk)
    pairs = 0
    for chunk in torch.arange(images).split(settings.image_chunk):
        regions = split.regions(chunk, "cpu", MAX_FEAT_NUM)
        if not clip:
            regions = {k: pad_to(v, MAX_FEAT_NUM) for k, v in regions.items()}
        for captions in torch.arange(split.num_captions).split(per_block):
            if clip:
                texts = split.texts(captions, "cpu")
            else:
                texts = {
                    "input_ids": pad_to(split.input_ids[captions], MAX_LENGTH),
                    "attention_mask": pad_to(split.attention_mask[captions], MAX_LENGTH),
                }
            img = torch.arange(len(chunk)).repeat_interleave(len(captions))
            txt = torch.arange(len(captions)).repeat(len(chunk))
            inputs = {k: v[img] for k, v in regions.items()}
            inputs.update({k: v[txt] for k, v in texts.items()})
            model(**(clip_inputs(inputs) if clip else inputs))
            pairs += len(img)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="val images (x5 captions)")
    parser.add_argument("--sample-images", type=int, default=16, help="images scored per variant")
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per forward")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = synthetic_dir(num_val=args.images)
    tokenizer = load_tokenizer(root / "wordpiece")
    table = load_from_disk(str(root))["val"]
    split = RetrievalSplit.from_table("val", table, tokenizer, max_length=MAX_LENGTH)
    feat_dim = table.features["features"].shape[1]
    sizes = {"feat_dim": feat_dim, "vocab_size": len(tokenizer), "pad_id": 0}
    two = build_two_stream(Config(TWO), **sizes).eval()
    single = build_single_stream(Config(SINGLE), **sizes).eval()
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    settings = EvalSettings(
        batch_size=args.batch_size, image_chunk=8, rerank_k=args.rerank_k, max_feat_num=MAX_FEAT_NUM
    )
    images, texts = split.num_images, split.num_captions
    all_pairs = images * texts
    print(
        f"split: {images} images x {texts} captions ({all_pairs} pairs); threads {torch.get_num_threads()}"
    )

    rates = {}
    for clip in (True, False):
        start = time.perf_counter()
        pairs = score_all_pairs(single, split, args.sample_images, settings, clip)
        seconds = time.perf_counter() - start
        rates[clip] = pairs / seconds
        name = (
            "with clip_inputs"
            if clip
            else f"fixed padding ({MAX_LENGTH} tokens, {MAX_FEAT_NUM} regions)"
        )
        print(
            f"single-stream all pairs, {name}: {rates[clip]:.0f} pairs/s "
            f"({pairs} pairs in {seconds:.1f}s); whole split projected {all_pairs / rates[clip] / 60:.1f} min"
        )

    with torch.no_grad():
        (img, txt), t_embed = timed(lambda: embed_split(accelerator, two, split, settings))
        _, t_sims = timed(lambda: similarity_ranks(accelerator, img, txt, split, settings))
        print(f"two-stream: embeddings {t_embed:.2f}s + similarities and R@K {t_sims:.3f}s")
        (_, rerank_pairs), t_rerank = timed(
            lambda: rerank_ranks(accelerator, single, img, txt, split, settings)
        )
    print(
        f"single-stream re-ranking of the two-stream top-{args.rerank_k}: {rerank_pairs} pairs in "
        f"{t_rerank + t_embed + t_sims:.1f}s with the two-stream pass "
        f"({all_pairs / rerank_pairs:.0f}x fewer pairs than all-pairs scoring)"
    )
    ratio = rates[True] / rates[False]
    print(
        f"ratio {ratio:.1f}x (single-stream all-pairs scoring, clip_inputs vs fixed padding, "
        f"{rates[True]:.0f} vs {rates[False]:.0f} pairs/s, {images}x{texts} synthetic split)"
    )


if __name__ == "__main__":
    main()
