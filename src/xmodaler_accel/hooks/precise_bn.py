"""Recompute BatchNorm running statistics with the current weights (detectron2's PreciseBN)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..checkpoint import rng_kept
from ..events import Event

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def update_bn_stats(
    model: torch.nn.Module,
    batches: Iterable[Any],
    num_iter: int,
    forward: Callable[[torch.nn.Module, Any], Any],
) -> None:
    """Set every BN layer's running mean/var to the exact average over `num_iter` batches."""
    bn_layers = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.training]
    if not bn_layers:
        return
    momenta = [bn.momentum for bn in bn_layers]
    for bn in bn_layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the exact mean over the batches seen
    count = 0
    for batch in itertools.islice(batches, num_iter):
        forward(model, batch)
        count += 1
    for bn, momentum in zip(bn_layers, momenta):
        bn.momentum = momentum
    if count < num_iter:
        raise ValueError(f"PreciseBN: the loader gave {count} batches, {num_iter} were asked for")


class PreciseBN:
    """Every `period` steps and at the end, recompute BN statistics over `num_iter` batches."""

    def __init__(
        self,
        period: int,
        data_loader: Iterable[Any],
        num_iter: int,
        forward: Callable[[torch.nn.Module, Any], Any] = lambda model, batch: model(batch),
    ) -> None:
        self.period, self.data_loader, self.num_iter, self.forward = (
            period,
            data_loader,
            num_iter,
            forward,
        )

    def attach(self, engine: Any, name: str = "PreciseBN") -> PreciseBN:
        engine.on(Event.STEP_END, self, every=self.period, name=name)
        engine.on(Event.TRAIN_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        model = engine.unwrapped_model
        was_training = model.training
        model.train()
        with rng_kept():  # its loader and dropout must not move the training RNG
            update_bn_stats(model, self.data_loader, self.num_iter, self.forward)
        model.train(was_training)
