"""Map-style torch datasets over the memory-mapped Arrow tables (caption, pair, VCR views).

Items hold read-only numpy views of the Arrow buffers for regions and small Python/numpy
values for text; collation (`collate.py`) pads and copies once into tensors. Each item carries
`index` (its position in this dataset) so distributed evaluation can drop duplicates by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from .columns import ArrowColumns

OPTIONAL_REGION_COLUMNS = ("cls_prob", "region_labels")


def _int_arrays(rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(row, dtype=np.int64) for row in rows]


class ImageDataset(TorchDataset):
    """One item per image: `features` (N, D), `boxes` (N, 5) and optional region labels."""

    def __init__(self, table: Dataset) -> None:
        self.table = table
        self.columns = ArrowColumns(table)
        self._optional = [c for c in OPTIONAL_REGION_COLUMNS if c in table.column_names]

    def __len__(self) -> int:
        return len(self.table)

    def regions(self, row: int) -> dict[str, Any]:
        """Region arrays of image-table row `row` (views, no copy)."""
        item = {
            "image_index": row,
            "image_id": self.columns.value("image_id", row),
            "features": self.columns.array("features", row),
            "boxes": self.columns.array("boxes", row),
        }
        for name in self._optional:
            item[name] = self.columns.array(name, row)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.regions(index)}


class CaptionDataset(ImageDataset):
    """One item per image with its captions as token ids (`[BOS] w.. [EOS]`) and references.

    `max_seq_len` counts words (X-modaler's convention). With `seq_per_img` set, every item
    has exactly that many captions: all of them when the image has that many, else a sample
    drawn from (seed, epoch, index), so it is reproducible and changes with `set_epoch`.
    """

    def __init__(
        self,
        table: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_seq_len: int = 20,
        seq_per_img: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(table)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.seq_per_img = seq_per_img
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def choose(self, num_captions: int, index: int) -> list[int]:
        """Which captions of an image this item uses."""
        wanted = self.seq_per_img
        if wanted is None or wanted == num_captions:
            return list(range(num_captions))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if num_captions > wanted:
            return [int(i) for i in rng.choice(num_captions, size=wanted, replace=False)]
        extra = rng.choice(num_captions, size=wanted - num_captions, replace=True)
        return list(range(num_captions)) + [int(i) for i in extra]

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_len + 2)[
            "input_ids"
        ]
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        references = self.columns.value("captions", index)
        chosen = self.choose(len(references), index)
        item["references"] = references
        item["input_ids"] = self.encode([references[i] for i in chosen])
        return item


class PairDataset(ImageDataset):
    """One item per (image, caption): retrieval pairs and pretraining pairs.

    `max_length` counts tokens including special tokens (Hugging Face's convention). With
    `with_regions=False` items hold text only (to embed captions once in retrieval evaluation).
    """

    def __init__(
        self,
        table: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 40,
        with_regions: bool = True,
    ) -> None:
        super().__init__(table)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.with_regions = with_regions
        lengths = self.columns.list_lengths("captions")
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(image row, caption number within the image) of pair `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        row = int(np.searchsorted(self.starts, index, side="right")) - 1
        return row, index - int(self.starts[row])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, k = self.locate(index)
        if self.with_regions:
            item = self.regions(row)
        else:
            item = {"image_index": row, "image_id": self.columns.value("image_id", row)}
        caption = self.columns.value("captions", row)[k]
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"]
        item.update(index=index, caption=caption, input_ids=np.asarray(ids, dtype=np.int64))
        return item


class VCRDataset(TorchDataset):
    """VCR items: Q->A inputs (question + each answer) and QA->R inputs (+ each rationale).

    Each choice is tokenised as a pair with word-to-region tags carried to every sub-word
    (`-1` where a token refers to no region). For unlabeled items (test) QA->R uses answer 0.
    """

    def __init__(
        self,
        questions: Dataset,
        images: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 64,
    ) -> None:
        self.questions = ArrowColumns(questions)
        self.images = ImageDataset(images)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_dict(
        cls, data: DatasetDict, split: str, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
    ) -> VCRDataset:
        """Questions from `data[f"vcr_{split}"]`, regions from `data[split]`."""
        return cls(data[f"vcr_{split}"], data[split], tokenizer, **kwargs)

    def __len__(self) -> int:
        return len(self.questions)

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

        question, question_tags = value("question"), value("question_tags")
        answers, answer_tags = value("answer_choices"), value("answer_tags")
        answer_label, rationale_label = value("answer_label"), value("rationale_label")
        right = max(answer_label, 0)
        item = {"index": index, **self.images.regions(value("image_row"))}
        item.update(answer_label=answer_label, rationale_label=rationale_label)
        qa = self.encode(question, question_tags, answers, answer_tags)
        qar = self.encode(
            question + answers[right],
            question_tags + answer_tags[right],
            value("rationale_choices"),
            value("rationale_tags"),
        )
        item.update({f"qa_{k}": v for k, v in qa.items()})
        item.update({f"qar_{k}": v for k, v in qar.items()})
        return item
