"""Where an SCST step's time goes on the synthetic config, and what the vectorised reward saves.

Runs `scst_step` (5 samples per image, greedy baseline, 16 images) with the synthetic recipe's
Transformer, alternating the vectorised CIDEr-D scorer with a per-candidate one (Python dicts per
caption, the way coco-caption's CiderD scores), and prints the time split of each step: generation,
reward, teacher-forced forward, backward + optimizer.

    .venv/bin/python benchmarks/scst_step.py [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from xmodaler_accel.data import ImageDataset, dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.scoring.cider_reference import cider_d, cut, document_frequency
from xmodaler_accel.tasks.captioning import (
    build_reward_scorer,
    captioner_from_config,
    image_collate,
    load_caption_config,
    scst_step,
    training_references,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class PerCandidateCider:
    """CIDEr-D one caption at a time over n-gram dicts: the baseline the vectorised scorer replaces."""

    def __init__(self, refs: list, eos_id: int, pad_id: int) -> None:
        self.eos_id, self.pad_id = eos_id, pad_id
        self.refs = [[[*r, eos_id] for r in image_refs] for image_refs in refs]
        self.df, self.log_n = document_frequency(self.refs)

    def score(self, image_index, candidates) -> np.ndarray:
        tokens = np.asarray(candidates)
        return np.array(
            [
                cider_d(cut(seq, self.eos_id, self.pad_id), self.refs[i], self.df, self.log_n)
                for i, seq in zip(np.asarray(image_index), tokens)
            ]
        )


def one_step(model, optimizer, batch, scorer) -> dict[str, float]:
    engine = SimpleNamespace(
        model=model, unwrapped_model=model, gathered_model=lambda: nullcontext(model), scalars={}
    )
    start = time.perf_counter()
    out = scst_step(engine, batch, scorer=scorer, samples_per_image=5, max_len=20)
    before_backward = time.perf_counter()
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    end = time.perf_counter()
    return {**engine.scalars, "time_backward": end - before_backward, "total": end - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_caption_config(RECIPES / "synthetic.yaml", [f"data.cache_dir={tmp}"])
        data, tokenizer = open_dataset(cfg), load_tokenizer(dataset_dir(cfg))
        model = captioner_from_config(cfg, tokenizer, data["train"]).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        fast = build_reward_scorer(cfg, data["train"], tokenizer)
        slow = PerCandidateCider(
            training_references(data["train"], tokenizer),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        images = ImageDataset(data["train"])
        collate = image_collate(cfg)
        times: dict[str, list[dict]] = {"vectorised": [], "per-candidate": []}
        for step in range(args.steps + 1):
            batch = collate([images[i] for i in range(step * 16, step * 16 + 16)])
            for name, scorer in (("vectorised", fast), ("per-candidate", slow)):
                torch.manual_seed(step)
                result = one_step(model, optimizer, batch, scorer)
                if step:  # the first step warms up
                    times[name].append(result)
    for name, rows in times.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{name:>14} reward: step {med['total'] * 1e3:7.1f} ms = generate "
            f"{med['time_generate'] * 1e3:6.1f} + reward {med['time_reward'] * 1e3:6.1f} + "
            f"forward {med['time_forward'] * 1e3:6.1f} + backward/optim "
            f"{med['time_backward'] * 1e3:6.1f}; reward share {med['time_reward'] / med['total']:.1%}"
        )
    fast_total = statistics.median(r["total"] for r in times["vectorised"])
    slow_total = statistics.median(r["total"] for r in times["per-candidate"])
    share = statistics.median(r["time_reward"] for r in times["vectorised"]) / fast_total
    print(
        f"ratio {slow_total / fast_total:.2f}x (SCST step with vectorised vs per-candidate CIDEr-D, "
        f"synthetic config, 16 images x 5 samples; reward share {share:.1%} of the step)"
    )


if __name__ == "__main__":
    main()
