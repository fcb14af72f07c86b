"""The pretraining data view: masked (image, caption) pairs and their batch.

`PretrainPairs` gives one item per (image, caption) pair, already masked: BERT masking of
the WordPiece caption (15%; 80% [MASK], 10% random, 10% kept), masked regions (15%, features of
90% of them zeroed), a caption of another image as the ITM negative, and the generation
stream's caption in the captioning vocabulary with its input words masked too. Matching is
scored on the unmasked pair and negative (UNITER's choice; X-modaler's single-stream data masks
them too: on the synthetic task, ITM alone on masked inputs was still at chance after 650 steps,
where unmasked inputs had reached 67%).
Masks are drawn from (seed, epoch, pair index) alone, so they do not depend on workers, process
count or batch composition, and a resumed run replays them exactly. `collate_pretrain` pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ...data import PairDataset, collate_pairs, mask_regions, mask_tokens, pad_ids, pad_regions
from ...masking import IGNORE_INDEX


def caption_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int, int]:
    """(BOS, EOS, PAD, MASK) of a captioning tokenizer; WordPiece's [CLS]/[SEP] serve as BOS/EOS
    and UNK as the mask of a word-level vocabulary, which has no [MASK]."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    mask = tokenizer.mask_token_id
    mask = tokenizer.unk_token_id if mask is None else mask
    if None in (bos, eos, tokenizer.pad_token_id, mask):
        raise ValueError("the caption tokenizer needs BOS/EOS (or CLS/SEP), PAD and UNK tokens")
    return bos, eos, tokenizer.pad_token_id, mask


class PretrainPairs(PairDataset):
    """Masked (image, caption) pairs with an ITM negative caption (see the module docstring)."""

    def __init__(
        self,
        table: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        caption_tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 40,
        max_seq_len: int = 20,
        mask_prob: float = 0.15,
        region_mask_prob: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(table, tokenizer, max_length=max_length)
        if tokenizer.mask_token_id is None:
            raise ValueError("data.tokenizer must be a BERT WordPiece tokenizer with [MASK]")
        if len(self.starts) < 3:
            raise ValueError("pretraining needs at least two images (ITM negatives)")
        self.caption_tokenizer = caption_tokenizer
        self.caption_ids = caption_specials(caption_tokenizer)
        self.max_seq_len = max_seq_len
        self.mask_prob, self.region_mask_prob = mask_prob, region_mask_prob
        self.seed, self.epoch = seed, 0
        specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        self.special = torch.tensor([i for i in specials if i is not None])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        """The random stream of one pair in the current epoch."""
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def mask_text(self, ids: np.ndarray, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT masking of WordPiece ids: (masked ids, labels with IGNORE_INDEX elsewhere)."""
        ids_t = torch.from_numpy(ids)
        masked, labels = mask_tokens(
            ids_t,
            torch.isin(ids_t, self.special),
            mask_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            prob=self.mask_prob,
            generator=gen,
        )
        return masked.numpy(), labels.numpy()

    def negative_pair(self, row: int, gen: torch.Generator) -> int:
        """A pair index drawn uniformly from the pairs of every other image."""
        own = int(self.starts[row + 1] - self.starts[row])
        draw = int(torch.randint(len(self) - own, (1,), generator=gen))
        return draw + own if draw >= self.starts[row] else draw

    def caption_item(self, caption: str, gen: torch.Generator) -> dict[str, np.ndarray]:
        """Generation-stream input (BOS w1..wn, words masked), targets and the masked flags."""
        bos, _, pad, mask_id = self.caption_ids
        encoded = self.caption_tokenizer(caption, truncation=True, max_length=self.max_seq_len + 2)[
            "input_ids"
        ]
        ids = torch.tensor(encoded, dtype=torch.long)
        inputs = ids[:-1]
        keep = (inputs == bos) | (inputs == pad)
        keep[0] = True
        masked, labels = mask_tokens(
            inputs,
            keep,
            mask_id=mask_id,
            vocab_size=len(self.caption_tokenizer),
            prob=self.mask_prob,
            generator=gen,
        )
        return {
            "caption_input": masked.numpy(),
            "caption_target": ids[1:].numpy(),
            "caption_masked": (labels != IGNORE_INDEX).numpy(),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        gen = self.generator(index)
        negative = super().__getitem__(self.negative_pair(self.locate(index)[0], gen))
        item["negative_ids"] = negative["input_ids"]
        item["input_ids"], item["mlm_labels"] = self.mask_text(item["input_ids"], gen)
        features = torch.tensor(np.asarray(item["features"], dtype=np.float32))
        masked, picked = mask_regions(
            features,
            torch.ones(len(features), dtype=torch.bool),
            prob=self.region_mask_prob,
            generator=gen,
        )
        item.update(
            target_features=features.numpy(), features=masked.numpy(), region_picked=picked.numpy()
        )
        item.update(self.caption_item(item["caption"], gen))
        return item


def _pad_flags(rows: Sequence[np.ndarray], limit: int | None = None) -> torch.Tensor:
    return pad_ids([np.asarray(r[:limit], dtype=np.int64) for r in rows])[0].bool()


def collate_pretrain(
    items: Sequence[dict[str, Any]],
    *,
    max_feat_num: int = 50,
    pad_id: int = 0,
    caption_pad_id: int = 0,
) -> dict[str, Any]:
    """Pad `PretrainPairs` items: `collate_pairs`'s batch plus labels, targets and negatives.

    Captions, their unmasked `clean_ids` and the negatives are padded to one length, so that
    they can share a forward pass; `target_features` are the unmasked regions.
    """
    batch = collate_pairs(items, max_feat_num=max_feat_num, pad_id=pad_id)
    count = len(items)
    texts = [it["input_ids"] for it in items] + [it["negative_ids"] for it in items]
    ids, mask = pad_ids(texts, pad_id=pad_id)
    labels, _ = pad_ids([it["mlm_labels"] for it in items], pad_id=IGNORE_INDEX)
    labels = F.pad(labels, (0, ids.shape[1] - labels.shape[1]), value=IGNORE_INDEX)
    clean = torch.where(labels != IGNORE_INDEX, labels, ids[:count])
    limit = max_feat_num if max_feat_num > 0 else None
    targets, _, _ = pad_regions(
        [it["target_features"] for it in items],
        [it["boxes"] for it in items],
        max_feat_num=max_feat_num,
    )
    caption_input, _ = pad_ids([it["caption_input"] for it in items], pad_id=caption_pad_id)
    batch.update(
        input_ids=ids[:count],
        attention_mask=mask[:count],
        clean_ids=clean,
        negative_ids=ids[count:],
        negative_mask=mask[count:],
        mlm_labels=labels,
        target_features=targets,
        region_picked=_pad_flags([it["region_picked"] for it in items], limit),
        caption_input=caption_input,
        caption_target=pad_ids([it["caption_target"] for it in items], pad_id=IGNORE_INDEX)[0],
        caption_masked=_pad_flags([it["caption_masked"] for it in items]),
    )
    return batch
