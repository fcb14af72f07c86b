"""The captioning data view: images with their captions as token ids, and the XE batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ...config import Config
from ...data import ImageDataset, collate_images, pad_ids
from ...masking import IGNORE_INDEX


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


def collate_xe(
    items: Sequence[dict[str, Any]],
    *,
    max_feat_num: int = 50,
    use_global_v: bool = False,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    pad_multiple: int = 1,
) -> dict[str, Any]:
    """Teacher-forcing batch: `input_ids` = BOS w1..wn, `target_ids` = w1..wn EOS (padding
    `ignore_index`), [B * seq_per_img, T], rows image-major; regions stay [B, N, D]. T is
    rounded up to `pad_multiple` (`data.pad_multiple`: bounded recompiles under torch.compile;
    the padding is masked out of the loss, and causal attention never sees it)."""
    per_image = {len(item["input_ids"]) for item in items}
    if len(per_image) != 1:
        raise ValueError(
            f"images have {sorted(per_image)} captions each; build CaptionDataset with "
            "seq_per_img=... so that every image gives the same number"
        )
    batch = collate_images(items, max_feat_num=max_feat_num, use_global_v=use_global_v)
    sequences = [seq for item in items for seq in item["input_ids"]]
    width = {"multiple": pad_multiple}
    inputs, token_mask = pad_ids([seq[:-1] for seq in sequences], pad_id=pad_id, **width)
    targets, _ = pad_ids([seq[1:] for seq in sequences], pad_id=ignore_index, **width)
    batch.update(
        input_ids=inputs, target_ids=targets, token_mask=token_mask, seq_per_img=per_image.pop()
    )
    return batch


def image_collate(cfg: Config) -> Callable:
    """One row per image (SCST and evaluation batches), with `data.max_feat_num/use_global_v`."""
    return partial(
        collate_images, max_feat_num=cfg.data.max_feat_num, use_global_v=cfg.data.use_global_v
    )
