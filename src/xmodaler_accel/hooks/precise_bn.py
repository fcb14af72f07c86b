"""Recompute BatchNorm running statistics with the current weights (detectron2's PreciseBN)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

from ..checkpoint import rng_kept
from ..events import Event
from .compat import bind_either

logger = logging.getLogger(__name__)

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def training_bn_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BN layers in training mode: the ones PreciseBN updates (a frozen one is in eval)."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.training]


@torch.no_grad()
def update_bn_stats(
    model: torch.nn.Module,
    batches: Iterable[Any],
    num_iter: int,
    forward: Callable[[torch.nn.Module, Any], Any],
) -> None:
    """Set the running mean/var of every BN layer in training mode to the exact average over
    `num_iter` batches; BN layers in eval mode (frozen) are left as they are."""
    bn_layers = training_bn_layers(model)
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


def _call_model(model: torch.nn.Module, batch: Any) -> Any:
    return model(batch)


def _ours(
    period: int,
    data_loader: Iterable[Any],
    num_iter: int,
    forward: Callable[[torch.nn.Module, Any], Any] = _call_model,
):
    """PreciseBN(period, data_loader, num_iter, forward=model(batch)): the Engine's model."""


def _xmodaler(period: int, model: torch.nn.Module, data_loader: Iterable[Any], num_iter: int):
    """X-modaler's: PreciseBN(period, model, data_loader, num_iter), `model(batch)`."""


class PreciseBN:
    """Every `period` steps and at the end, recompute BN statistics over `num_iter` batches.

    Only BN layers in training mode when it runs are updated: one the user froze (put in eval
    mode) keeps its statistics, as in X-modaler and detectron2. The model is the Engine's
    (unwrapped), or X-modaler's `PreciseBN(period, model, data_loader, num_iter)`'s; without a
    BN layer in training mode at construction, that form is disabled, as X-modaler's.
    `update_stats()` runs it at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        use_xmodaler = "model" in kwargs or (len(args) > 1 and isinstance(args[1], torch.nn.Module))
        bound = bind_either("PreciseBN", args, kwargs, _ours, _xmodaler, use_xmodaler)
        self.period, self.data_loader = bound["period"], bound["data_loader"]
        self.num_iter = bound["num_iter"]
        self.forward = bound.get("forward", _call_model)
        self.model: torch.nn.Module | None = bound.get("model")
        self.disabled = self.model is not None and not training_bn_layers(self.model)
        if self.disabled:
            logger.info("PreciseBN is disabled: the model has no BN layer in training mode")
        self._engine: Any = None

    def attach(self, engine: Any, name: str = "PreciseBN") -> PreciseBN:
        self._engine = engine
        engine.on(Event.STEP_END, self, every=self.period, name=name)
        engine.on(Event.TRAIN_END, self, name=name)
        return self

    def __call__(self, engine: Any) -> None:
        self._engine = engine
        self.update_stats()

    def update_stats(self) -> None:
        """Recompute the statistics now (X-modaler's method; the hook calls it)."""
        if self.disabled:
            return
        # Under FSDP and ZeRO-3 the parameters are gathered for the duration; buffers persist.
        gathered = self._engine.gathered_model() if self.model is None else nullcontext(self.model)
        with rng_kept(), gathered as model:  # its loader and dropout keep the training RNG
            update_bn_stats(model, self.data_loader, self.num_iter, self.forward)
