"""The VCR data view: one sub-task per item (Q->A or QA->R) with 4 tokenised candidates, and the
batch that keeps an item's candidates together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from ...data import ImageDataset, collate_images, pad_ids
from ...data.columns import ArrowColumns
from ...models.vcr import MODEL_INPUTS

TASKS = ("qa", "qar")
UNUSED_REGION_KEYS = ("cls_prob", "region_labels", "image_ids")


def _int_arrays(rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(row, dtype=np.int64) for row in rows]


class VCRTaskDataset(TorchDataset):
    """One VCR sub-task per item: `qa` (question + each answer) or `qar` (+ right answer + each
    rationale); an item holds its regions, 4 tokenised candidates with region tags, and `label`."""

    def __init__(
        self,
        questions: Dataset,
        images: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str,
        max_length: int = 64,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.questions = ArrowColumns(questions)
        self.images = ImageDataset(images)
        self.tokenizer = tokenizer
        self.max_length = max_length

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
        return cls(data[f"vcr_{split}"], data[split], tokenizer, task=task, max_length=max_length)

    def __len__(self) -> int:
        return len(self.questions)

    def labels(self) -> list[int]:
        """The right choice of every item (-1 where the split is unlabeled)."""
        column = "answer_label" if self.task == "qa" else "rationale_label"
        return [int(v) for v in self.questions.scalars(column)]

    def encode(
        self, first: list[str], first_tags: list[int], choices: list, choice_tags: list
    ) -> dict[str, list[np.ndarray]]:
        enc = self.tokenizer(
            [first] * len(choices),
            list(choices),
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=True,
        )
        tags = []
        for k in range(len(choices)):
            source = (first_tags, choice_tags[k])
            words, sequences = enc.word_ids(k), enc.sequence_ids(k)
            tags.append([-1 if w is None else source[s][w] for w, s in zip(words, sequences)])
        return {
            "input_ids": _int_arrays(enc["input_ids"]),
            "token_type_ids": _int_arrays(enc["token_type_ids"]),
            "tags": _int_arrays(tags),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        def value(name: str) -> Any:
            return self.questions.value(name, index)

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
        item = {"index": index, **self.images.regions(value("image_row")), "label": label}
        item.update(self.encode(first, first_tags, choices, choice_tags))
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
