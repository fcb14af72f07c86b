"""A BERT-style single-stream encoder over words and image regions, and its matching head.

The joint sequence is `[CLS] w1 .. wn [SEP] r1 .. rm`: words go through BERT's word, position
and segment embeddings; each region is `LayerNorm(W_f f) + LayerNorm(W_b box)` (UNITER), with
segment id `visual_type_id` and one shared position id (location comes from the box), so the
region embeddings do not depend on how much text padding precedes them. The BERT itself is
`transformers.BertModel`, randomly initialised from a `BertConfig` or loaded from a local
checkpoint directory (never from a hub). Retrieval, VCR and pretraining put their heads on
`pooled` (the BERT pooler over [CLS]) or on `sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # imported where a model is built: loading BERT's code takes seconds
    from transformers import BertConfig, BertModel

REGION_POSITION_ID = 0


@dataclass
class SingleStreamOutput:
    """Hidden states `sequence` [B, T + N, H] (text first), `pooled` [B, H], text length T."""

    sequence: torch.Tensor
    pooled: torch.Tensor
    text_length: int

    @property
    def text(self) -> torch.Tensor:
        return self.sequence[:, : self.text_length]

    @property
    def regions(self) -> torch.Tensor:
        return self.sequence[:, self.text_length :]


class RegionEmbeddings(nn.Module):
    """Projected region features plus projected boxes (before BERT's segment/position terms)."""

    def __init__(self, feat_dim: int, hidden_size: int, box_dim: int = 5, eps: float = 1e-12):
        super().__init__()
        self.feature = nn.Linear(feat_dim, hidden_size)
        self.feature_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.box = nn.Linear(box_dim, hidden_size)
        self.box_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature.weight.dtype)
        boxes = boxes.to(self.box.weight.dtype)
        return self.feature_norm(self.feature(features)) + self.box_norm(self.box(boxes))


class SingleStreamEncoder(nn.Module):
    """BERT over word tokens and region features jointly: `forward(...) -> SingleStreamOutput`."""

    def __init__(
        self,
        bert: BertModel,
        feat_dim: int,
        *,
        box_dim: int = 5,
        visual_type_id: int = 1,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if bert.pooler is None:
            raise ValueError("the BertModel needs its pooling layer (add_pooling_layer=True)")
        if visual_type_id >= bert.config.type_vocab_size:
            raise ValueError(
                f"visual_type_id {visual_type_id} needs type_vocab_size > {visual_type_id}, "
                f"the BERT has {bert.config.type_vocab_size}"
            )
        self.bert = bert
        self.regions = RegionEmbeddings(
            feat_dim, bert.config.hidden_size, box_dim, bert.config.layer_norm_eps
        )
        self.visual_type_id = visual_type_id
        self.pooling = pooling

    @property
    def config(self) -> BertConfig:
        return self.bert.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> SingleStreamOutput:
        """Words [B, T] (mask True/1 for real tokens) and regions [B, N, D], [B, N, box_dim]."""
        batch, length = input_ids.shape
        num_regions, device = features.shape[1], input_ids.device
        words = self.bert.embeddings.word_embeddings(input_ids)
        regions = self.regions(features, boxes).to(words.dtype)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        visual_types = torch.full((batch, num_regions), self.visual_type_id, device=device)
        text_positions = torch.arange(length, device=device).expand(batch, length)
        region_positions = torch.full((batch, num_regions), REGION_POSITION_ID, device=device)
        mask = torch.cat([attention_mask.long(), region_mask.long()], dim=1)
        out = self.bert(
            inputs_embeds=torch.cat([words, regions], dim=1),
            attention_mask=mask,
            token_type_ids=torch.cat([token_type_ids, visual_types], dim=1),
            position_ids=torch.cat([text_positions, region_positions], dim=1),
        )
        pooled = out.pooler_output
        if self.pooling == "mean":  # BERT's pooler layer over the mean of all real positions
            weights = mask.to(out.last_hidden_state.dtype)[..., None]
            mean = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            pooled = self.bert.pooler.activation(self.bert.pooler.dense(mean))
        return SingleStreamOutput(out.last_hidden_state, pooled, length)


class ITMHead(nn.Module):
    """Image-text matching logits from the pooled output (1 output: a score; 2: UNITER's classes)."""

    def __init__(self, hidden_size: int, num_outputs: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # fp32 under autocast: bf16 keeps 8 bits of mantissa, so close scores would tie, and
        # R@K counts a tie with the positive as a miss.
        with torch.autocast(pooled.device.type, enabled=False):
            logits = self.classifier(self.dropout(pooled.float()))
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


def bert_from_config(
    sizes: Any, *, vocab_size: int, pad_id: int, type_vocab_size: int = 2
) -> BertModel:
    """`build_bert` with a `model.single_stream` section's sizes, or the BERT in its `bert_dir`."""
    return build_bert(
        vocab_size=vocab_size,
        hidden_size=sizes.hidden,
        num_layers=sizes.layers,
        num_heads=sizes.heads,
        intermediate_size=sizes.intermediate,
        dropout=sizes.dropout,
        type_vocab_size=type_vocab_size,
        pad_token_id=pad_id,
        bert_dir=sizes.bert_dir,
    )


def build_bert(
    *,
    vocab_size: int,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    intermediate_size: int = 3072,
    dropout: float = 0.1,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
    pad_token_id: int = 0,
    bert_dir: str | Path = "",
) -> BertModel:
    """A randomly initialised BertModel, or the one saved in the local directory `bert_dir`.

    A loaded BERT keeps its own sizes (the size arguments are ignored), but its vocabulary must
    cover `vocab_size` tokens. Nothing is downloaded: `bert_dir` must hold `config.json` and the
    weights (`model.safetensors` or `pytorch_model.bin`).
    """
    from transformers import BertConfig, BertModel

    if bert_dir:
        path = Path(bert_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.single_stream.bert_dir: {path} has no config.json; give a local BERT "
                "checkpoint directory (downloading from a hub is not supported)"
            )
        # float32 whatever dtype the checkpoint was saved in (mixed precision is autocast's job)
        bert = BertModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        if bert.config.vocab_size < vocab_size:
            raise ValueError(
                f"BERT at {path} has {bert.config.vocab_size} word embeddings but the tokenizer "
                f"has {vocab_size} tokens; use the BERT's own vocab.txt as the tokenizer"
            )
        return bert
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        pad_token_id=pad_token_id,
    )
    return BertModel(config, add_pooling_layer=True)
