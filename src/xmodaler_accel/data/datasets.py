"""Map-style torch datasets over the memory-mapped Arrow tables that several tasks share:
one item per image (regions), one item per (image, caption) pair. Task-specific views live in
`tasks/<task>/data.py`.

Items hold read-only numpy views of the Arrow buffers for regions and small Python/numpy
values for text; collation (`collate.py`) pads and copies once into tensors. Each item carries
`index` (its position in this dataset) so distributed evaluation can drop duplicates by index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from .columns import ArrowColumns

OPTIONAL_REGION_COLUMNS = ("cls_prob", "region_labels")


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
