"""VCR's multiple-choice scorer: the single-stream BERT encoder with grounded tags and a score head.

Each candidate (question + answer for Q->A, question + right answer + rationale for QA->R) is one
sequence `[CLS] first [SEP] choice [SEP] r1 .. rm`; the head scores its pooled output and the 4
scores of an item go through a softmax (4-way cross-entropy in `tasks/vcr/steps.py`).

Object tags. The data layer renders a VCR tag such as `[2]` as the object's class name ("person")
and keeps, for every sub-word of that name, the index of the region it refers to (`tags`, -1 for
ordinary words). Here the referred region's embedding (the `RegionEmbeddings` vector that also
enters BERT as that region's own token) is added to the word embedding of each of those sub-words,
so "person" says which person. `ground_tags=False` keeps the names and drops the pointers.

Segments: the first text segment has token type 0, the choice 1 and the regions 2 (UNITER's VCR
model adds token types the same way); a loaded BERT with two token types gets a third row, a copy
of type 0 (UNITER's initialisation of its new VCR types).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .single_stream import (
    REGION_POSITION_ID,
    ITMHead,
    SingleStreamEncoder,
    bert_from_config,
)

VISUAL_TYPE_ID = 2
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "tags",
    "features",
    "boxes",
    "region_mask",
)


def ground_words(words: torch.Tensor, regions: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """`words` [S, T, H] plus, where `tags` [S, T] >= 0, the tagged row of `regions` [S, N, H]."""
    index = tags.clamp(min=0)[..., None].expand(-1, -1, regions.shape[-1])
    pointed = torch.gather(regions, 1, index)
    return words + pointed * (tags >= 0)[..., None].to(words.dtype)


def joint_pooled(
    encoder: SingleStreamEncoder,
    words: torch.Tensor,
    regions: torch.Tensor,
    attention_mask: torch.Tensor,
    region_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
) -> torch.Tensor:
    """The encoder's pooled output [S, H] for word and region embeddings given directly.

    The same joint sequence as `SingleStreamEncoder.forward` (text positions 0..T-1, one shared
    region position, region segment `encoder.visual_type_id`), starting from embeddings so that
    grounded word embeddings can go in.
    """
    batch, length = words.shape[:2]
    num_regions, device = regions.shape[1], words.device
    visual_types = torch.full((batch, num_regions), encoder.visual_type_id, device=device)
    text_positions = torch.arange(length, device=device).expand(batch, length)
    region_positions = torch.full((batch, num_regions), REGION_POSITION_ID, device=device)
    mask = torch.cat([attention_mask.long(), region_mask.long()], dim=1)
    out = encoder.bert(
        inputs_embeds=torch.cat([words, regions.to(words.dtype)], dim=1),
        attention_mask=mask,
        token_type_ids=torch.cat([token_type_ids, visual_types], dim=1),
        position_ids=torch.cat([text_positions, region_positions], dim=1),
    )
    if encoder.pooling == "cls":
        return out.pooler_output
    weights = mask.to(out.last_hidden_state.dtype)[..., None]
    mean = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return encoder.bert.pooler.activation(encoder.bert.pooler.dense(mean))


class VCRModel(nn.Module):
    """`forward(...) -> logits [B, C]`: one score per candidate sequence of each item."""

    def __init__(
        self, encoder: SingleStreamEncoder, head: ITMHead, *, ground_tags: bool = True
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.ground_tags = ground_tags

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        tags: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Text [B, C, T] (tags index the region axis, -1 for none); regions [B, N, ...]."""
        batch, choices, length = input_ids.shape
        # Regions are projected once per item and shared by its C candidate sequences.
        regions = self.encoder.regions(features, boxes).repeat_interleave(choices, dim=0)
        region_mask = region_mask.repeat_interleave(choices, dim=0)

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch * choices, length)

        words = self.encoder.bert.embeddings.word_embeddings(flat(input_ids))
        if self.ground_tags:
            words = ground_words(words, regions.to(words.dtype), flat(tags))
        pooled = joint_pooled(
            self.encoder, words, regions, flat(attention_mask), region_mask, flat(token_type_ids)
        )
        return self.head(pooled).view(batch, choices)


def add_token_type(bert: nn.Module, size: int) -> None:
    """Grow BERT's token-type table to `size` rows, new rows copying type 0 (UNITER's VCR init)."""
    old = bert.embeddings.token_type_embeddings
    if old.num_embeddings >= size:
        return
    new = nn.Embedding(size, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings :] = old.weight[0]
    bert.embeddings.token_type_embeddings = new
    bert.config.type_vocab_size = size


def build_vcr_model(cfg: Any, *, feat_dim: int, vocab_size: int, pad_id: int) -> VCRModel:
    """`VCRModel` from `model:` (`single_stream` sizes or `bert_dir`, `ground_tags`)."""
    sizes = cfg.single_stream
    bert = bert_from_config(
        sizes, vocab_size=vocab_size, pad_id=pad_id, type_vocab_size=VISUAL_TYPE_ID + 1
    )
    add_token_type(bert, VISUAL_TYPE_ID + 1)
    encoder = SingleStreamEncoder(
        bert, feat_dim, visual_type_id=VISUAL_TYPE_ID, pooling=sizes.pooling
    )
    head = ITMHead(bert.config.hidden_size, 1, sizes.dropout)
    return VCRModel(encoder, head, ground_tags=cfg.ground_tags)
