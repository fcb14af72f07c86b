"""Vision-language pretraining step (X-modaler's `TDENPretrainer`).

`pretrain_step(engine, batch, two_stage=...)` follows X-modaler's `TDENPretrainer`:
stage one computes the matching, masked-language, masked-region and generation losses; stage
two feeds the masked positions the model's own stage-one predictions (scheduled sampling in
pretraining) and computes the same losses without matching. `two_stage`:

- "separate" (X-modaler): two optimizer steps per batch. The step itself backpropagates stage
  one, clips as the engine is configured to (`engine.clip_grad`), steps and zeroes the optimizer,
  then returns stage two's loss, which the engine steps as usual. The LR scheduler steps once per
  batch (as X-modaler's does per iteration). Gradient accumulation is not supported with it.
- "summed": one optimizer step on the sum of both stages' losses (both stages in one forward).
- "off": stage one only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...models.pretrain import second_stage_batch
from ...objectives import (
    caption_loss,
    itm_accuracy,
    itm_loss,
    masked_accuracy,
    masked_lm_loss,
    region_accuracy,
    region_feature_loss,
    region_kl_loss,
)

TWO_STAGE_MODES = ("separate", "summed", "off")
LOSS_NAMES = ("mlm", "mrm_class", "mrm_feature", "itm", "caption")


def stage_losses(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    itm: bool,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum of the objectives, {loss_<name>, <name>_acc}) for one stage's outputs."""
    picked = batch["region_picked"]
    terms = {
        "mlm": masked_lm_loss(out["mlm_logits"], batch["mlm_labels"]),
        "mrm_feature": region_feature_loss(
            out["region_features"], batch["target_features"], picked
        ),
        "caption": caption_loss(
            out["caption_logits"], batch["caption_target"], smoothing=smoothing
        ),
    }
    metrics = {
        "mlm_acc": masked_accuracy(out["mlm_logits"], batch["mlm_labels"]),
        "caption_acc": masked_accuracy(out["caption_logits"], batch["caption_target"]),
    }
    if "region_logits" in out:
        terms["mrm_class"] = region_kl_loss(out["region_logits"], batch["cls_prob"], picked)
        metrics["mrm_acc"] = region_accuracy(out["region_logits"], batch["cls_prob"], picked)
    logits = out["itm_logits"]
    if itm:
        labels = itm_labels(logits, len(batch["input_ids"]))
        terms["itm"] = itm_loss(logits, labels)
        metrics["itm_acc"] = itm_accuracy(logits, labels)
    total = sum(weights[name] * value for name, value in terms.items())
    if not itm:
        total = total + 0.0 * logits.sum()  # keeps the matching head in the graph (DDP)
    metrics.update({f"loss_{name}": value.detach() for name, value in terms.items()})
    return total, {name: value.detach() for name, value in metrics.items()}


def itm_labels(logits: torch.Tensor, pairs: int) -> torch.Tensor:
    """1 for the first `pairs` logits (matching pairs), 0 for the negatives after them."""
    return (torch.arange(len(logits), device=logits.device) < pairs).float()


def _second(metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}_s2": value for name, value in metrics.items()}


def pretrain_step(
    engine: Any,
    batch: Mapping[str, Any],
    *,
    two_stage: str = "separate",
    weights: Mapping[str, float] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """TDEN's step (module docstring); `loss` is what the engine backpropagates and steps."""
    if two_stage not in TWO_STAGE_MODES:
        raise ValueError(f"pretrain.two_stage: {two_stage!r} is not one of {TWO_STAGE_MODES}")
    unknown = set(weights or {}) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"pretrain.loss_weights: unknown {sorted(unknown)}; expected {LOSS_NAMES}")
    weights = {**dict.fromkeys(LOSS_NAMES, 1.0), **(weights or {})}
    losses = {"weights": weights, "smoothing": label_smoothing}
    if two_stage == "summed":
        first, second = engine.model(batch, two_pass=True)
        loss1, metrics1 = stage_losses(first, batch, itm=True, **losses)
        loss2, metrics2 = stage_losses(second, batch, itm=False, **losses)
        out = {"loss": loss1 + loss2, "loss_s1": loss1.detach(), "loss_s2": loss2.detach()}
        return {**out, **metrics1, **_second(metrics2)}
    (first,) = engine.model(batch)
    loss1, metrics1 = stage_losses(first, batch, itm=True, **losses)
    if two_stage == "off":
        return {"loss": loss1, **metrics1}
    if engine.accelerator.gradient_accumulation_steps > 1:
        raise ValueError(
            "pretrain.two_stage=separate steps the optimizer after each stage and cannot "
            "accumulate gradients (train.grad_accum > 1); use pretrain.two_stage=summed"
        )
    norm = engine.inner_update(loss1)
    batch2 = second_stage_batch(batch, first)
    del first  # only its predictions are needed: free the vocabulary-sized logits
    (second,) = engine.model(batch2, itm=False)
    loss2, metrics2 = stage_losses(second, batch, itm=False, **losses)
    out = {"loss": loss2, "loss_s1": loss1.detach(), "loss_s2": loss2.detach()}
    if norm is not None:
        out["grad_norm_s1"] = norm
    return {**out, **metrics1, **_second(metrics2)}
