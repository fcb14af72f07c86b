"""Retrieval models: two-stream embeddings (X-modaler's `RetrievalTrainer`) and a single-stream
matcher (BERT joint encoder + ITM head, `SingleStreamRetrievalTrainer`), built from `model:`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..masking import masked_mean
from .single_stream import ITMHead, SingleStreamEncoder, bert_from_config

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned inverse temperature here


def _transformer(hidden: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        hidden, heads, 4 * hidden, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class RegionEncoder(nn.Module):
    """Regions (features + boxes) -> optional self-attention -> masked mean -> joint space."""

    def __init__(
        self,
        feat_dim: int,
        hidden: int,
        embed_dim: int,
        *,
        layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        box_dim: int = 5,
    ) -> None:
        super().__init__()
        self.feature = nn.Linear(feat_dim, hidden)
        self.box = nn.Linear(box_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.layers = _transformer(hidden, heads, layers, dropout) if layers else None
        self.out = nn.Linear(hidden, embed_dim)

    def forward(
        self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.norm(self.feature(features.to(self.feature.weight.dtype)) + self.box(boxes))
        x = x + self.mlp(x)
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~region_mask.bool())
        return self.out(masked_mean(x, region_mask))


class TextEncoder(nn.Module):
    """Token ids -> bidirectional GRU or Transformer -> masked mean -> joint space."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        embed_dim: int,
        *,
        kind: str = "gru",
        layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        pad_id: int = 0,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        if kind not in ("gru", "transformer"):
            raise ValueError(f"model.two_stream.text_encoder: {kind!r} is not gru or transformer")
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        if kind == "gru":
            self.rnn = nn.GRU(hidden, hidden // 2, layers, batch_first=True, bidirectional=True)
        else:
            self.position = nn.Embedding(max_length, hidden)
            self.layers = _transformer(hidden, heads, layers, dropout)
        self.out = nn.Linear(hidden if kind == "transformer" else 2 * (hidden // 2), embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(input_ids))
        mask = attention_mask.bool()
        if self.kind == "gru":
            lengths = mask.sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            mask = mask[:, : x.shape[1]]
        else:
            x = x + self.position(torch.arange(x.shape[1], device=x.device))
            x = self.layers(x, src_key_padding_mask=~mask)
        return self.out(masked_mean(x, mask))


class TwoStreamRetrieval(nn.Module):
    """Images and captions embedded separately into one L2-normalised space (VSE++ / CLIP)."""

    def __init__(
        self, images: RegionEncoder, texts: TextEncoder, temperature: float | None = None
    ) -> None:
        super().__init__()
        self.images, self.texts = images, texts
        # Only the InfoNCE loss uses a (learned) temperature; DDP rejects unused parameters.
        self.logit_scale = (
            nn.Parameter(torch.tensor(math.log(1.0 / temperature))) if temperature else None
        )

    @property
    def embed_dim(self) -> int:
        return self.images.out.out_features

    def embed_images(
        self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        return nn.functional.normalize(self.images(features, boxes, region_mask), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.texts(input_ids, attention_mask), dim=-1)

    def forward(
        self,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`image` [B, E], `text` [B, E] and, with a temperature, `logit_scale` (a scalar)."""
        out = {
            "image": self.embed_images(features, boxes, region_mask),
            "text": self.embed_texts(input_ids, attention_mask),
        }
        if self.logit_scale is not None:
            out["logit_scale"] = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return out


class SingleStreamRetrieval(nn.Module):
    """Scores (image, caption) pairs with a joint encoder and an ITM head: higher = matching."""

    def __init__(self, encoder: SingleStreamEncoder, head: ITMHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One matching logit per pair, [B]."""
        out = self.encoder(input_ids, attention_mask, features, boxes, region_mask, token_type_ids)
        return self.head(out.pooled)


def build_two_stream(cfg: Any, *, feat_dim: int, vocab_size: int, pad_id: int) -> nn.Module:
    """`TwoStreamRetrieval` from `model.two_stream` (and the loss that decides the temperature)."""
    images = RegionEncoder(
        feat_dim,
        cfg.hidden,
        cfg.embed_dim,
        layers=cfg.image_layers,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )
    texts = TextEncoder(
        vocab_size,
        cfg.hidden,
        cfg.embed_dim,
        kind=cfg.text_encoder,
        layers=cfg.text_layers,
        heads=cfg.heads,
        dropout=cfg.dropout,
        pad_id=pad_id,
    )
    if cfg.loss not in ("max_violation", "infonce"):
        raise ValueError(f"model.two_stream.loss: {cfg.loss!r} is not max_violation or infonce")
    return TwoStreamRetrieval(images, texts, cfg.temperature if cfg.loss == "infonce" else None)


def build_single_stream(cfg: Any, *, feat_dim: int, vocab_size: int, pad_id: int) -> nn.Module:
    """`SingleStreamRetrieval` from `model.single_stream` (BERT random or from `bert_dir`)."""
    bert = bert_from_config(cfg, vocab_size=vocab_size, pad_id=pad_id)
    encoder = SingleStreamEncoder(bert, feat_dim, pooling=cfg.pooling)
    return SingleStreamRetrieval(encoder, ITMHead(bert.config.hidden_size, 1, cfg.dropout))


def build_retrieval_model(cfg: Any, *, feat_dim: int, vocab_size: int, pad_id: int) -> nn.Module:
    """The model `model.kind` names (two_stream | single_stream) from its sub-section."""
    builders = {"two_stream": build_two_stream, "single_stream": build_single_stream}
    if cfg.kind not in builders:
        raise ValueError(f"model.kind: {cfg.kind!r} is not two_stream or single_stream")
    return builders[cfg.kind](
        cfg[cfg.kind], feat_dim=feat_dim, vocab_size=vocab_size, pad_id=pad_id
    )
