"""Vision-language pretraining objectives, one plain function each (X-modaler's PretrainLosses).

Every loss is a mean over the positions that count (masked tokens, masked regions, valid pairs)
and is zero, not NaN, when a batch has none; none of them moves a tensor to the host. Positions
are selected with masks rather than boolean indexing, so nothing waits for the device.

- `masked_lm_loss`: cross-entropy at the masked tokens (BERT masking, `data.mask_tokens`).
- `region_kl_loss`: masked region classification against the detector's class distribution
  (`cls_prob`), KL(p_detector || p_model) summed over classes (UNITER's MRC-kl, X-modaler's
  "Masked Object Classification").
- `region_feature_loss`: masked region feature regression, the squared error averaged over the
  masked regions and the feature dimensions (X-modaler's "Masked Object Feature Regression").
- `itm_loss`: image-text matching, binary cross-entropy on one logit per pair, label 1 for a
  matching pair and 0 for a sampled negative (UNITER's ITM on a single score).
- `caption_loss`: the generation stream's next-token cross-entropy (label smoothing optional).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import IGNORE_INDEX
from .models.captioning import label_smoothed_loss


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is true; zero when it is nowhere true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy of `logits` [..., V] over the positions whose `labels` are not ignored."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def masked_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Fraction of the labelled positions where the arg-max of `logits` is the label."""
    valid = labels != ignore_index
    return _masked_mean((logits.argmax(-1) == labels).float(), valid)


def region_kl_loss(logits: Tensor, target_probs: Tensor, picked: Tensor) -> Tensor:
    """KL(target || softmax(logits)) over classes, averaged over the `picked` regions [B, N]."""
    target = target_probs.float()
    log_model = logits.float().log_softmax(-1)
    kl = (torch.special.xlogy(target, target) - target * log_model).sum(-1)
    return _masked_mean(kl, picked)


def region_feature_loss(predicted: Tensor, target: Tensor, picked: Tensor) -> Tensor:
    """Squared error averaged over feature dimensions and the `picked` regions [B, N]."""
    error = (predicted.float() - target.float()).pow(2).mean(-1)
    return _masked_mean(error, picked)


def region_accuracy(logits: Tensor, target_probs: Tensor, picked: Tensor) -> Tensor:
    """How often the predicted class of a picked region is the detector's most likely class."""
    agree = (logits.argmax(-1) == target_probs.argmax(-1)).float()
    return _masked_mean(agree, picked)


def itm_loss(logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of matching logits [R] against labels [R] (1 match, 0 negative)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return losses.mean() if valid is None else _masked_mean(losses, valid)


def itm_accuracy(logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Fraction of pairs classified right (logit > 0 means matching); chance is 50%."""
    right = ((logits > 0) == labels.bool()).float()
    return right.mean() if valid is None else _masked_mean(right, valid)


def caption_loss(
    logits: Tensor, targets: Tensor, *, smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Next-token cross-entropy of the generation stream (label-smoothed when `smoothing` > 0)."""
    return label_smoothed_loss(logits, targets, smoothing=smoothing, ignore_index=ignore_index)
