"""A training sampler whose position can be saved and restored without loading skipped samples.

The order of epoch `e` is a function of `(seed, e)` alone, so a resumed run replays the same order.
Resuming mid-epoch starts the permutation at `start_index` (samples consumed, counted over all
processes); the skip applies to the resumed epoch only (accelerate #1451, #2859).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices for one epoch, starting at `start_index`.

    Sharding across processes is left to Accelerate's `BatchSamplerShard`, which deals out the
    batches of this one global order round-robin, so every process builds the same sampler.
    """

    def __init__(self, data_source: Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = len(data_source)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def position_seed(self, samples_in_epoch: int) -> int:
        """Seed of the loader's generator (worker seeds) at a position: a function of
        (seed, epoch, position) only, so a resumed epoch draws what an uninterrupted one does."""
        return self.seed * 1_000_003 + self.epoch * 7919 + samples_in_epoch

    def skip(self, start_index: int) -> None:
        """Start the current epoch at `start_index` samples in; `skip(0)` for a full epoch."""
        self.start_index = max(0, min(start_index, self.num_samples))

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start_index :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def build_train_loader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    drop_last: bool = True,
    shuffle: bool = True,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` with a `ResumableSampler`, ready for `Engine` (exact resume).

    The loader gets its own `torch.Generator` so that starting an epoch never draws from the global
    RNG (torch draws worker base seeds at every `iter(loader)`), which would make a resumed run's
    dropout masks differ from an uninterrupted one.
    """
    sampler = ResumableSampler(dataset, seed=seed, shuffle=shuffle)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def steps_per_epoch(
    num_samples: int,
    batch_size: int,
    *,
    num_processes: int = 1,
    grad_accum: int = 1,
    drop_last: bool = True,
) -> int:
    """Optimizer steps in one pass over `num_samples`, as the Engine runs it.

    Accelerate deals whole batches of `batch_size` round-robin to the processes: with
    `drop_last` the incomplete global batch is dropped, otherwise the last one is filled from the
    start. A step takes `grad_accum` batches per process, the last step of an epoch fewer
    (Accelerate syncs at the end of the loader). X-modaler's epoch on one process is the same,
    floor(images / TRAIN_BATCH_SIZE) steps.
    """
    if drop_last:
        per_process = num_samples // batch_size // num_processes
    else:
        per_process = math.ceil(math.ceil(num_samples / batch_size) / num_processes)
    return math.ceil(per_process / grad_accum)


def find_resumable_sampler(loader: Any) -> ResumableSampler | None:
    """The ResumableSampler under a (possibly Accelerate-prepared) DataLoader, if any."""
    candidates = [
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None), "sampler", None
        ),
    ]
    for cand in candidates:
        if isinstance(cand, ResumableSampler):
            return cand
    return None
