"""Captioning steps: cross-entropy (X-modaler's DefaultTrainer) and self-critical sequence training
(RLTrainer, RLBeamTrainer, RLMeanTrainer) as plain functions `step(engine, batch) -> dict`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...decoding import beam_search, greedy, sample
from ...models.captioning import label_smoothed_loss

SAMPLERS = ("sample", "beam")
BASELINES = ("greedy", "mean", "leave_one_out")


def xe_step(
    engine: Any, batch: dict[str, Any], *, label_smoothing: float = 0.1
) -> dict[str, Tensor]:
    """Teacher-forced label-smoothed cross-entropy; each image is encoded once for its captions."""
    logits = engine.model(
        batch["features"],
        batch["boxes"],
        batch["region_mask"],
        batch["input_ids"],
        seq_per_img=batch["seq_per_img"],
    )
    return {"loss": label_smoothed_loss(logits, batch["target_ids"], smoothing=label_smoothing)}


def scst_step(
    engine: Any,
    batch: dict[str, Any],
    *,
    scorer: Any,
    sampler: str = "sample",
    baseline: str = "greedy",
    samples_per_image: int = 5,
    max_len: int = 20,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Self-critical policy gradient: loss = mean over samples of -(r - b) * sum_t log p(w_t).

    `sampler="sample"` draws `samples_per_image` captions per image; `"beam"` takes the beams of
    a beam search of that width (RLBeamTrainer). `baseline` is the greedy caption's reward
    (RLTrainer), the mean reward of the image's samples (RLBeamTrainer) or the mean of the
    other samples (leave-one-out, new self-critical). Generation and baselines run under
    no_grad; the log-probs come from one teacher-forced pass through the (DDP) model, so the
    encoder is trained too and gradients are synchronised as in XE. Rewards come from `scorer`
    (CIDEr-D on token ids, against the training references of `batch["index"]`).

    Dropout, as X-modaler's RLTrainer uses it: the greedy baseline is decoded with the model in
    eval mode (no dropout: the baseline of given weights is one number); the samples are drawn
    in train mode, and the teacher-forced pass that scores them runs in train mode too, with a
    dropout mask of its own (X-modaler scores the samples in the pass that draws them).
    """
    if sampler not in SAMPLERS or baseline not in BASELINES:
        raise ValueError(f"sampler must be one of {SAMPLERS} and baseline one of {BASELINES}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    n = samples_per_image
    # Decoding calls the model's methods: FSDP and ZeRO-3 gather its parameters for it.
    with torch.no_grad(), engine.gathered_model() as model:
        enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
        tokens = _generate(model, enc, sampler, n, max_len, temperature)
        greedy_tokens = (
            _greedy_in_eval_mode(model, batch, max_len) if baseline == "greedy" else None
        )
    timings["time_generate"] = time.perf_counter() - start

    start = time.perf_counter()
    images = np.asarray(batch["index"].tolist())  # the one host sync: rewards are scored on the CPU
    rewards = _as_device(scorer.score(np.repeat(images, n), tokens.cpu()), tokens.device)
    if greedy_tokens is not None:
        base = _as_device(
            scorer.score(images, greedy_tokens.cpu()), tokens.device
        ).repeat_interleave(n)
    else:
        base = _group_baseline(rewards.view(-1, n), leave_one_out=baseline == "leave_one_out")
        base = base.reshape(-1)
    timings["time_reward"] = time.perf_counter() - start

    start = time.perf_counter()
    log_probs = _sequence_log_probs(engine.model, batch, tokens, n, model.bos_id, model.pad_id)
    advantage = (rewards - base).to(log_probs.dtype)
    loss = -(advantage * log_probs).mean()
    timings["time_forward"] = time.perf_counter() - start
    engine.scalars.update(timings)
    return {
        "loss": loss,
        "reward": rewards.mean(),
        "baseline": base.mean(),
        "advantage_std": (rewards - base).std(),
        "sample_len": (tokens != model.pad_id).sum(-1).float().mean(),
    }


def _generate(model, enc, sampler: str, n: int, max_len: int, temperature: float) -> Tensor:
    """[B * n, T] token ids, image-major, PAD after EOS."""
    if sampler == "beam":
        beams = beam_search(model, enc, beam_size=n, max_len=max_len).beams  # [B, n, T]
        return beams.reshape(-1, beams.shape[-1])
    return sample(model, enc, n=n, temperature=temperature, max_len=max_len).tokens


def _greedy_in_eval_mode(model: torch.nn.Module, batch: dict, max_len: int) -> Tensor:
    """The greedy baseline with dropout off (X-modaler's RLTrainer: `model.eval()` for it)."""
    was_training = model.training
    model.eval()
    try:
        enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
        return greedy(model, enc, max_len=max_len).tokens
    finally:
        model.train(was_training)


def _group_baseline(rewards: Tensor, *, leave_one_out: bool) -> Tensor:
    """Per-image baseline [B, n]: the group mean, or the mean of the other n - 1 samples."""
    total = rewards.sum(dim=1, keepdim=True)
    n = rewards.shape[1]
    if leave_one_out:
        return (total - rewards) / max(n - 1, 1)
    return (total / n).expand_as(rewards)


def _sequence_log_probs(
    ddp_model: torch.nn.Module, batch: dict, tokens: Tensor, n: int, bos_id: int, pad_id: int
) -> Tensor:
    """Sum of log p(w_t) over each sequence's real tokens (EOS included), with grad."""
    inputs = torch.cat([torch.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], dim=1)
    logits = ddp_model(
        batch["features"], batch["boxes"], batch["region_mask"], inputs, seq_per_img=n
    ).float()
    token_lp = logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return token_lp.masked_fill(tokens == pad_id, 0.0).sum(dim=1)


def _as_device(values: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32).to(device, non_blocking=True)
