"""X-modaler's default captioner: a region Transformer encoder and a caption Transformer decoder.

Post-LayerNorm (BERT-style) layers as in X-modaler's TransformerEncoder/TransformerDecoder. Two
things make it faster than X-modaler at the same sizes: each image is encoded once and its
captions, beams or samples share the encoder output (cross-attention queries of an image's rows
are stacked against that image's keys/values, which are projected once in `encode`); and
incremental decoding keeps a key/value cache of the self-attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .captioning import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    CaptionModel,
    DecoderState,
    EncoderOutput,
    TokenEmbedding,
    VisualEmbedding,
    mix_in_predictions,
    sample_tokens,
)

KeyValue = tuple[Tensor, Tensor]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[R, T, d] -> [R, heads, T, d / heads]."""
    rows, length, width = x.shape
    return x.view(rows, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[R, heads, T, dh] -> [R, T, heads * dh]."""
    rows, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(rows, length, heads * head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention, whole sequence (`forward`) or one cached step (`step`)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, causal: bool = False
    ) -> tuple[Tensor, KeyValue]:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(merge_heads(out)), (k, v)

    def step(self, x: Tensor, cache: StepCache) -> tuple[Tensor, KeyValue]:
        """One new position x [R, 1, d] after the cached ones (see `preallocates_cache`)."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        if cache.preallocated:
            keys, values = cache.write(cache.keys, k), cache.write(cache.values, v)
            mask = cache.visible()
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=p)
        else:
            keys, values = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, dropout_p=p)
        return self.out(merge_heads(out)), (keys, values)


class CrossAttention(nn.Module):
    """Attention from caption rows to their image's regions; keys/values projected per image."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def project_memory(self, memory: Tensor) -> KeyValue:
        """Keys and values [B, heads, N, dh] of the encoded regions, once per image."""
        k, v = self.key_value(memory).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: Tensor, memory_kv: KeyValue, mask: Tensor, group: int) -> Tensor:
        """x [B * group, T, d] attends to [B, heads, N, dh]: an image's rows share its keys."""
        rows, length, dim = x.shape
        q = split_heads(self.query(x).reshape(rows // group, group * length, dim), self.heads)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, *memory_kv, attn_mask=mask[:, None, None, :], dropout_p=p
        )
        return self.out(merge_heads(out).reshape(rows, length, dim))


def preallocates_cache(device: torch.device) -> bool:
    """How incremental decoding keeps the self-attention keys and values.

    On an accelerator: preallocated for `max_len` and written in place, each step attending
    over the whole cache with a mask, so every step has the same shapes and no host value and
    a CUDA graph can replay it. On the CPU, where kernel launches cost nothing: grown by one
    position per step, the least work (and attention over exactly the prefix).
    """
    return device.type != "cpu"


@dataclass
class StepCache:
    """One layer's self-attention cache as one decoding step sees it."""

    keys: Tensor  # [R, heads, max_len (preallocated) or positions so far, dh]
    values: Tensor
    position: Tensor  # [R] int64, the position being decoded (equal in every row)
    preallocated: bool

    def visible(self) -> Tensor:
        """[R, 1, 1, max_len] bool: the positions up to the one being written."""
        slots = torch.arange(self.keys.shape[2], device=self.position.device)
        return (slots <= self.position[:, None])[:, None, None]

    def write(self, cache: Tensor, new: Tensor) -> Tensor:
        """`new` [R, heads, 1, dh] at `position`: in place, unless autograd records the pass
        (an in-place write would change tensors saved for backward by earlier steps)."""
        index = self.position[:1]
        if new.requires_grad:
            return cache.index_copy(2, index, new)
        return cache.index_copy_(2, index, new)


class FeedForward(nn.Sequential):
    """Position-wise Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class EncoderLayer(nn.Module):
    """Post-LN encoder layer: self-attention over regions, then feed-forward."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask=mask)[0]))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: causal self-attention, cross-attention to regions, feed-forward."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, dropout)
        self.cross_attn = CrossAttention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory_kv: KeyValue, memory_mask: Tensor, group: int) -> Tensor:
        """Teacher-forced: the whole prefix, causal."""
        return self._rest(self.self_attn(x, causal=True)[0], x, memory_kv, memory_mask, group)

    def step(
        self, x: Tensor, memory_kv: KeyValue, memory_mask: Tensor, group: int, cache: StepCache
    ) -> tuple[Tensor, KeyValue]:
        """One new position [R, 1, d] after the cached ones."""
        attn, kv = self.self_attn.step(x, cache)
        return self._rest(attn, x, memory_kv, memory_mask, group), kv

    def _rest(
        self, attn: Tensor, x: Tensor, memory_kv: KeyValue, memory_mask: Tensor, group: int
    ) -> Tensor:
        x = self.norm1(x + self.drop(attn))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory_kv, memory_mask, group)))
        return self.norm3(x + self.drop(self.ffn(x)))


class TransformerCaptioner(CaptionModel):
    """Region Transformer captioner; defaults follow X-modaler's COCO transformer.yaml.

    d_model 512, 8 heads, 6 + 6 layers, FFN 2048, dropout 0.1 (0.5 on the visual embedding and
    before the word predictor), LayerNorm eps 1e-12 in the layers (1e-5 in the embeddings), as
    X-modaler's BERT layers. `tie_embeddings` shares the word embedding with the predictor.
    `use_boxes` adds the 5-d box embedding (X-modaler's VISUAL_EMBED.LOCATION_SIZE 5, as in
    TDEN); transformer.yaml has none (LOCATION_SIZE 0), so set it false to be that model. With
    those settings an X-modaler `TransformerEncoderDecoder` checkpoint loads as is
    (`port.weights`) and gives X-modaler's logits, greedy and beam decodes.
    """

    def __init__(
        self,
        vocab_size: int,
        feat_dim: int,
        *,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        visual_dropout: float = 0.5,
        pred_dropout: float = 0.5,
        tie_embeddings: bool = False,
        use_boxes: bool = True,
        layer_norm_eps: float = 1e-12,
        max_len: int = 20,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__(vocab_size, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.visual_embed = VisualEmbedding(
            feat_dim, d_model, use_boxes=use_boxes, dropout=visual_dropout
        )
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout, layer_norm_eps)
            for _ in range(num_encoder_layers)
        )
        self.token_embed = TokenEmbedding(vocab_size, d_model, dropout=dropout)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ffn_dim, dropout, layer_norm_eps)
            for _ in range(num_decoder_layers)
        )
        self.pred_dropout = nn.Dropout(pred_dropout)
        self.predictor = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.predictor.weight = self.token_embed.embed.weight

    def encode(self, features: Tensor, boxes: Tensor, region_mask: Tensor) -> EncoderOutput:
        """Encoded regions plus every decoder layer's cross-attention keys/values, per image."""
        x = self.visual_embed(features, boxes)
        attn_mask = region_mask[:, None, None, :]
        for layer in self.encoder_layers:
            x = layer(x, attn_mask)
        cache = tuple(
            t for layer in self.decoder_layers for t in layer.cross_attn.project_memory(x)
        )
        return EncoderOutput(memory=x, mask=region_mask, cache=cache)

    def _memory_kv(self, enc: EncoderOutput, layer: int) -> KeyValue:
        return enc.cache[2 * layer], enc.cache[2 * layer + 1]

    def decode(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Teacher-forced logits [rows, T, V] in one causal pass over the whole caption."""
        x = self.token_embed(input_ids)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, self._memory_kv(enc, i), enc.mask, enc.group)
        return self.predictor(self.pred_dropout(x))

    def decode_scheduled(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Two passes: sample predictions without grad, mix them into the inputs, decode again."""
        with torch.no_grad():
            predicted = sample_tokens(self.decode(enc, input_ids))
        return self.decode(enc, mix_in_predictions(input_ids, predicted, self.ss_prob, self.pad_id))

    def init_state(self, enc: EncoderOutput, max_len: int | None = None) -> DecoderState:
        """(position [rows], then keys and values [rows, heads, L, dh] per decoder layer): L is
        `max_len` where the cache is preallocated (`preallocates_cache`), else 0 and growing."""
        device = enc.memory.device
        length = (max_len or self.max_len) if preallocates_cache(device) else 0
        position = torch.zeros(enc.rows, dtype=torch.long, device=device)
        shape = (enc.rows, self.num_heads, length, self.head_dim)
        caches = tuple(enc.cache[0].new_zeros(shape) for _ in range(2 * len(self.decoder_layers)))
        return (position, *caches)

    def decode_step(
        self, enc: EncoderOutput, state: DecoderState, tokens: Tensor
    ) -> tuple[Tensor, DecoderState]:
        """Log-probs for one new position, attending to the cached keys/values up to it."""
        position, *caches = state
        preallocated = preallocates_cache(position.device)
        x = self.token_embed(tokens[:, None], start=position)
        new_caches: list[Tensor] = []
        for i, layer in enumerate(self.decoder_layers):
            cache = StepCache(caches[2 * i], caches[2 * i + 1], position, preallocated)
            x, kv = layer.step(x, self._memory_kv(enc, i), enc.mask, enc.group, cache)
            new_caches.extend(kv)
        logits = self.predictor(self.pred_dropout(x[:, 0]))
        return logits.float().log_softmax(-1), (position + 1, *new_caches)

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        position, *caches = state
        return (position, *(t.index_select(0, index) for t in caches))
