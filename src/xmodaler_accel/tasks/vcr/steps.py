"""VCR training (X-modaler's `VCRTrainer`): Q->A and QA->R batches from two loaders in every step.

The Engine drives the Q->A loader; the QA->R loader is a `SecondLoader` that `vcr_step` draws from,
with its own epoch and sample position, checkpointed with the hooks and restored on `--resume`.
Each step either sums the two losses (`mode="sum"`, one forward over both batches and one
optimizer update) or alternates them as X-modaler does (`mode="alternate"`: update on Q->A, then
on QA->R, two updates per step; the LR schedule still advances once per step, as X-modaler's does
once per iteration).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...models.vcr import MODEL_INPUTS
from ...second_loader import SecondLoader
from .data import concat_choice_batches

MODES = ("sum", "alternate")


def choice_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-way softmax cross-entropy, accuracy) of candidate scores [B, C] against labels [B]."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def _forward(engine: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return choice_loss(engine.model(**{k: batch[k] for k in MODEL_INPUTS}), batch["labels"])


def vcr_step(
    engine: Any, batch: dict[str, Any], *, qar_loader: SecondLoader, mode: str = "sum"
) -> dict[str, torch.Tensor]:
    """Q->A on the Engine's batch and QA->R on `qar_loader`'s next batch, summed or alternated."""
    if mode not in MODES:
        raise ValueError(f"vcr.mode must be one of {MODES}, got {mode!r}")
    if mode == "sum":
        qar_batch = qar_loader.next_batch()
        joint = concat_choice_batches(batch, qar_batch)
        logits = engine.model(**{k: joint[k] for k in MODEL_INPUTS})
        qa_logits, qar_logits = logits.split([len(batch["labels"]), len(qar_batch["labels"])])
        qa_loss, qa_acc = choice_loss(qa_logits, batch["labels"])
        qar_loss, qar_acc = choice_loss(qar_logits, qar_batch["labels"])
        loss = qa_loss + qar_loss
    else:
        if engine.accelerator.gradient_accumulation_steps != 1:
            raise ValueError(
                "vcr.mode=alternate makes one optimizer update per sub-task inside each step and "
                "needs train.grad_accum=1 (use vcr.mode=sum to accumulate)"
            )
        qa_loss, qa_acc = _forward(engine, batch)
        engine.inner_update(qa_loss)
        qar_loss, qar_acc = _forward(engine, qar_loader.next_batch())
        loss = qar_loss  # the Engine backpropagates it and makes the second update
    return {
        "loss": loss,
        "qa_loss": qa_loss.detach(),
        "qar_loss": qar_loss.detach(),
        "qa_acc": qa_acc,
        "qar_acc": qar_acc,
    }
