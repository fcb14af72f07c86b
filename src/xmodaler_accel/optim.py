"""Optimizers and per-optimizer-step LR schedules from config, including X-modaler's Noam."""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import ConfigError

logger = logging.getLogger(__name__)


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optim.name`: adam | adamw | sgd; weight decay is not applied to biases and norms."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name = o.name.lower()
    if name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    raise ValueError(f"config key 'optim.name': unknown optimizer {o.name!r} (adam, adamw, sgd)")


def lr_factor(cfg: Any, max_steps: int):
    """The multiplier of `optim.lr` at optimizer step `s` (0-based) for `lr_scheduler.name`."""
    s = cfg.lr_scheduler
    warmup = max(s.warmup_steps, 0)
    name = s.name.lower()
    if name == "constant":
        return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    if name == "noam":
        # X-modaler's NoamLR: lr = base * factor * d^-0.5 * min(n^-0.5, n * warmup^-1.5), n from 1.
        def noam(step: int) -> float:
            n = step + 1
            return s.factor * s.model_size**-0.5 * min(n**-0.5, n * max(warmup, 1) ** -1.5)

        return noam
    if name == "step":
        if not s.step_size:
            raise ConfigError(
                "lr_scheduler.name 'step' needs lr_scheduler.step_size (steps) or "
                "lr_scheduler.step_size_epochs"
            )
        return lambda step: s.gamma ** (step // s.step_size)
    if name == "warmup_multistep":  # X-modaler's WarmupMultiStepLR
        milestones = sorted(s.milestones)

        def multistep(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
            return ramp * s.gamma ** bisect_right(milestones, step)

        return multistep
    if name in ("warmup_linear", "warmup_cosine"):

        def decay(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
            shape = (
                1 - progress
                if name == "warmup_linear"
                else 0.5 * (1 + math.cos(math.pi * progress))
            )
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

        return decay
    raise ValueError(
        f"config key 'lr_scheduler.name': unknown schedule {s.name!r} "
        "(constant, noam, step, warmup_multistep, warmup_linear, warmup_cosine)"
    )


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step by the Engine."""
    return LambdaLR(optimizer, lr_factor(cfg, max_steps))


def auto_scale_workers(cfg: Any, world_size: int) -> float:
    """Scale `optim.lr` linearly when world size x grad accumulation differs from the reference.

    Returns the factor (1.0 when off or unchanged) and logs the change, as detectron2's
    `DefaultTrainer.auto_scale_workers` does for the reference world size.
    """
    if not cfg.train.auto_scale_workers:
        return 1.0
    workers = world_size * cfg.train.grad_accum
    factor = workers / cfg.train.reference_workers
    if factor != 1.0:
        old = cfg.optim.lr
        cfg.optim.lr = old * factor
        logger.info(
            "auto_scale_workers: %d processes x %d accumulation vs reference %d: "
            "optim.lr %.3g -> %.3g",
            world_size,
            cfg.train.grad_accum,
            cfg.train.reference_workers,
            old,
            cfg.optim.lr,
        )
    return factor
