"""A second training loader drawn from inside a step, whose position is checkpointed.

For steps that need batches of two kinds (VCR's Q->A and QA->R, multi-task training): the Engine
drives one loader, the step draws from this one. Its epoch and sample position are saved with the
hooks and restored on `--resume` by re-seeking the sampler, so no skipped batch is loaded.
"""

from __future__ import annotations

from typing import Any

from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import send_to_device
from torch.utils.data import BatchSampler, DataLoader

from .events import Event
from .samplers import ResumableSampler, find_resumable_sampler


class SecondLoader:
    """A second training loader, iterated from inside a step, whose position is checkpointed.

    Built from a `build_train_loader` loader and sharded like Accelerate shards the Engine's
    (each process takes every `num_processes`-th batch of one global order), without Accelerate's
    `DataLoaderShard` so that the Engine's gradient-accumulation state is left alone. Batches
    come on the device. `attach(engine)` subscribes it, which makes the Engine save
    `state_dict()` in every checkpoint and hand it back on resume.
    """

    def __init__(self, loader: DataLoader, accelerator: Any) -> None:
        sampler = find_resumable_sampler(loader)
        if sampler is None:
            raise TypeError("SecondLoader needs a loader built with build_train_loader")
        self.sampler: ResumableSampler = sampler
        self.accelerator = accelerator
        batches: Any = BatchSampler(sampler, loader.batch_size, loader.drop_last)
        if accelerator.num_processes > 1:
            batches = BatchSamplerShard(
                batches,
                num_processes=accelerator.num_processes,
                process_index=accelerator.process_index,
                even_batches=accelerator.even_batches,
            )
        self.loader = DataLoader(
            loader.dataset,
            batch_sampler=batches,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            generator=loader.generator,
        )
        self.global_batch_size = loader.batch_size * accelerator.num_processes
        self.epoch = 0
        self.samples_in_epoch = 0  # consumed in the current epoch, over all processes
        self._batches: Any = None

    def attach(self, engine: Any, name: str = "second_loader") -> SecondLoader:
        engine.on(Event.TRAIN_START, self.rewind, name=name)
        return self

    def rewind(self, engine: Any = None) -> None:
        """Forget the open iterator: the next batch is read from the saved position."""
        self._batches = None

    def _open(self) -> None:
        if self.samples_in_epoch >= self.sampler.num_samples:
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip(self.samples_in_epoch)
        if self.loader.generator is not None:  # worker seeds from (seed, epoch, position) only
            self.loader.generator.manual_seed(self.sampler.position_seed(self.samples_in_epoch))
        self._batches = iter(self.loader)

    def next_batch(self) -> Any:
        """The next batch of this process on its device; a new epoch starts when one runs out."""
        if self._batches is None:
            self._open()
        batch = next(self._batches, None)
        if batch is None:
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0
            self._open()
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError(
                    f"the second loader's dataset ({self.sampler.num_samples} samples) is smaller "
                    f"than one global batch of {self.global_batch_size}"
                )
        self.samples_in_epoch += self.global_batch_size
        return send_to_device(batch, self.accelerator.device)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "sampler_seed": self.sampler.seed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"the checkpoint's second loader took {state['global_batch_size']} samples per "
                f"step, this run takes {self.global_batch_size}: its position would not match"
            )
        self.epoch, self.samples_in_epoch = state["epoch"], state["samples_in_epoch"]
        self.sampler.seed = state["sampler_seed"]
        self.rewind()
