"""VCR training (X-modaler's `VCRTrainer`): Q->A and QA->R batches from two loaders in every step.

The Engine drives the Q->A loader; the QA->R loader is a `SecondLoader` that `vcr_step` draws from,
with its own epoch and sample position, checkpointed with the hooks and restored on `--resume`
(it re-seeks by sample index, so no skipped batch is loaded). Each step either sums the two losses
(`mode="sum"`, one forward over both batches and one optimizer update) or alternates them as
X-modaler does (`mode="alternate"`: update on Q->A, then on QA->R, two updates per step; the LR
schedule still advances once per step, as X-modaler's does once per iteration).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import send_to_device
from datasets import DatasetDict
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from ..data import VCRDataset, collate_images, pad_ids
from ..events import Event
from ..models.vcr import MODEL_INPUTS
from ..samplers import ResumableSampler, find_resumable_sampler

TASKS = ("qa", "qar")
MODES = ("sum", "alternate")
UNUSED_REGION_KEYS = ("cls_prob", "region_labels", "image_ids")


class VCRTaskDataset(TorchDataset):
    """One VCR sub-task per item: `qa` (question + each answer) or `qar` (+ right answer + each
    rationale); an item holds its regions, 4 tokenised candidates with region tags, and `label`."""

    def __init__(self, vcr: VCRDataset, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.vcr, self.task = vcr, task

    @classmethod
    def from_dict(
        cls,
        data: DatasetDict,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        task: str,
        *,
        max_length: int = 64,
    ) -> VCRTaskDataset:
        """The `task` view of questions `data[f"vcr_{split}"]` over regions `data[split]`."""
        return cls(VCRDataset.from_dict(data, split, tokenizer, max_length=max_length), task)

    def __len__(self) -> int:
        return len(self.vcr)

    def labels(self) -> list[int]:
        """The right choice of every item (-1 where the split is unlabeled)."""
        column = "answer_label" if self.task == "qa" else "rationale_label"
        return [int(v) for v in self.vcr.questions.scalars(column)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        def value(name: str) -> Any:
            return self.vcr.questions.value(name, index)

        first, first_tags = value("question"), value("question_tags")
        if self.task == "qa":
            choices, choice_tags = value("answer_choices"), value("answer_tags")
            label = value("answer_label")
        else:  # QA->R is conditioned on the right answer (answer 0 where unlabeled)
            right = max(value("answer_label"), 0)
            first = first + value("answer_choices")[right]
            first_tags = first_tags + value("answer_tags")[right]
            choices, choice_tags = value("rationale_choices"), value("rationale_tags")
            label = value("rationale_label")
        item = {"index": index, **self.vcr.images.regions(value("image_row")), "label": label}
        item.update(self.vcr.encode(first, first_tags, choices, choice_tags))
        return item


def collate_choices(
    items: Sequence[dict[str, Any]],
    *,
    max_feat_num: int = 50,
    use_global_v: bool = False,
    pad_id: int = 0,
) -> dict[str, Any]:
    """Regions [B, N, ...] and candidates [B, C, T] kept together per item, plus `labels` [B].

    Tags index the padded region axis (shifted by one with `use_global_v`); a tag pointing past
    the `max_feat_num` truncation becomes -1.
    """
    batch = collate_images(items, max_feat_num=max_feat_num, use_global_v=use_global_v)
    for key in UNUSED_REGION_KEYS:
        batch.pop(key, None)
    choices = len(items[0]["input_ids"])
    ids, mask = pad_ids([s for item in items for s in item["input_ids"]], pad_id=pad_id)
    types, _ = pad_ids([s for item in items for s in item["token_type_ids"]])
    tags, _ = pad_ids([s for item in items for s in item["tags"]], pad_id=-1)
    limit = max_feat_num if max_feat_num > 0 else None
    kept = torch.tensor([len(item["features"][:limit]) for item in items])
    kept = kept.repeat_interleave(choices)[:, None]
    tags = torch.where((tags >= 0) & (tags < kept), tags + int(use_global_v), -1)
    shape = (len(items), choices, ids.shape[1])
    batch.update(
        input_ids=ids.view(shape),
        attention_mask=mask.view(shape),
        token_type_ids=types.view(shape),
        tags=tags.view(shape),
        labels=torch.tensor([item["label"] for item in items], dtype=torch.long),
    )
    return batch


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "tags")
PAD_VALUES = {"tags": -1, "attention_mask": False, "region_mask": False}


def _pad_axis(x: torch.Tensor, size: int, dim: int, value: Any) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def concat_choice_batches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model inputs and labels of two choice batches as one batch (text and regions padded)."""
    out = {"labels": torch.cat([a["labels"], b["labels"]])}
    for key in MODEL_INPUTS:
        dim = 2 if key in TEXT_KEYS else 1  # [B, C, T] text, [B, N, ...] regions
        size = max(a[key].shape[dim], b[key].shape[dim])
        value = PAD_VALUES.get(key, 0)
        padded = [_pad_axis(x[key], size, dim, value) for x in (a, b)]
        out[key] = torch.cat(padded)
    return out


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
            self.loader.generator.manual_seed(
                self.sampler.seed * 1_000_003 + self.epoch * 7919 + self.samples_in_epoch
            )
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
