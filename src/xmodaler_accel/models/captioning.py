"""Pieces every captioner shares: the encoder output, the model contract, embeddings, the loss.

The contract (`CaptionModel`) is what decoding, steps and recipes rely on, so they treat the
Transformer and Up-Down alike: `encode` once per image, `expand` the `EncoderOutput` to captions,
beams or samples (copying nothing), then either a teacher-forced `decode` or an incremental
`decode_step` whose state is a tuple of tensors (reordering it is `index_select`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masking import IGNORE_INDEX

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

DecoderState = tuple[Tensor, ...]


@dataclass(frozen=True)
class EncoderOutput:
    """What the encoder hands the decoder, computed once per image.

    Decoder rows are image-major with `group` consecutive rows per image (its captions, beams or
    samples). Tensors here stay per image ([B, ...]); decoders broadcast them over each image's
    rows, so `expand` is free and the encoder never sees a repeated image.
    """

    memory: Tensor  # [B, N, d] encoded regions
    mask: Tensor  # [B, N] bool, True for real regions
    cache: tuple[Tensor, ...] = ()  # per-image tensors precomputed from memory (keys/values)
    pooled: Tensor | None = None  # [B, d] mean over real regions (Up-Down's global feature)
    group: int = 1

    @property
    def num_images(self) -> int:
        return self.memory.shape[0]

    @property
    def rows(self) -> int:
        """Number of decoder rows: images times rows per image."""
        return self.memory.shape[0] * self.group

    def expand(self, n: int) -> EncoderOutput:
        """Each decoder row becomes `n` consecutive rows (captions, beams, samples); no copy."""
        if n < 1:
            raise ValueError(f"expand needs n >= 1, got {n}")
        return replace(self, group=self.group * n)

    def detach(self) -> EncoderOutput:
        """The same output cut from the graph (for decoding under no_grad next to a grad pass)."""
        return replace(
            self,
            memory=self.memory.detach(),
            cache=tuple(t.detach() for t in self.cache),
            pooled=None if self.pooled is None else self.pooled.detach(),
        )

    def per_row(self, tensor: Tensor) -> Tensor:
        """Repeat a per-image tensor [B, ...] to one entry per decoder row [B * group, ...]."""
        return tensor if self.group == 1 else tensor.repeat_interleave(self.group, dim=0)


class CaptionModel(nn.Module):
    """The captioner contract: encode once per image, decode teacher-forced or step by step.

    Subclasses implement `encode`, `decode`, `decode_scheduled`, `init_state` and `decode_step`.
    Token ids follow the tokenizer (PAD 0, BOS 1, EOS 2); `max_len` is the default number of
    generated tokens; `ss_prob` is the scheduled-sampling probability a hook sets during XE.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        max_len: int = 20,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.ss_prob: float = 0.0

    def forward(
        self,
        features: Tensor,
        boxes: Tensor,
        region_mask: Tensor,
        input_ids: Tensor,
        seq_per_img: int = 1,
    ) -> Tensor:
        """Teacher-forced logits [B * S, T, V]: encode each image once, expand to its S captions."""
        if input_ids.shape[0] != features.shape[0] * seq_per_img:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows but {features.shape[0]} images x "
                f"seq_per_img={seq_per_img} captions need {features.shape[0] * seq_per_img}"
            )
        enc = self.encode(features, boxes, region_mask).expand(seq_per_img)
        if self.training and self.ss_prob > 0:
            return self.decode_scheduled(enc, input_ids)
        return self.decode(enc, input_ids)

    def encode(self, features: Tensor, boxes: Tensor, region_mask: Tensor) -> EncoderOutput:
        """Encode regions [B, N, D] (boxes [B, N, 5], mask [B, N]) once per image."""
        raise NotImplementedError

    def decode(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Teacher-forced logits [enc.rows, T, V] for inputs [enc.rows, T] (BOS w1 .. wn)."""
        raise NotImplementedError

    def decode_scheduled(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        """Like `decode`, feeding back the model's own samples with probability `ss_prob`."""
        raise NotImplementedError

    def init_state(self, enc: EncoderOutput, max_len: int | None = None) -> DecoderState:
        """Empty decoder state for `enc.rows` rows, before the BOS step; room for `max_len`
        steps (default `self.max_len`) where the state preallocates (the Transformer's cache)."""
        raise NotImplementedError

    def decode_step(
        self, enc: EncoderOutput, state: DecoderState, tokens: Tensor
    ) -> tuple[Tensor, DecoderState]:
        """Feed one token per row [enc.rows]; returns (log-probs [enc.rows, V], new state)."""
        raise NotImplementedError

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        """Pick decoder rows (beam search); `index` must keep each row within its image."""
        return tuple(t.index_select(0, index) for t in state)


def sinusoid_positions(start: int, length: int, dim: int, device: torch.device) -> Tensor:
    """Sinusoidal encodings [length, dim] of positions start..start+length-1 (Vaswani et al.)."""
    position = torch.arange(start, start + length, device=device, dtype=torch.float32)
    return sinusoid_at(position, dim)


def sinusoid_at(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal encodings [..., dim] of a tensor of positions (no host value: capturable)."""
    device = positions.device
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = positions.to(torch.float32)[..., None] * freq
    table = torch.zeros(*positions.shape, dim, device=device)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return table


class TokenEmbedding(nn.Module):
    """Word embedding (+ sinusoidal position), optional ReLU and LayerNorm, dropout.

    Mirrors X-modaler's TokenBaseEmbedding; `start` offsets positions for incremental decoding.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        positional: bool = True,
        activation: bool = False,
        norm: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.positional = positional
        self.activation = activation
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, start: int | Tensor = 0) -> Tensor:
        """ids [R, T] at positions start.. ; `start` may be a tensor [R] (one new token per row,
        T = 1), which keeps incremental decoding free of host values."""
        x = self.embed(ids)
        if self.positional:
            if isinstance(start, Tensor):  # every row is at the same position
                table = sinusoid_at(start[:1, None], x.shape[-1])
            else:
                table = sinusoid_positions(start, ids.shape[1], x.shape[-1], x.device)
            x = x + table.to(x.dtype)
        if self.activation:
            x = F.relu(x)
        return self.dropout(self.norm(x))


class VisualEmbedding(nn.Module):
    """Region features (+ 5-d boxes) to model width: linear, ReLU, optional LayerNorm, dropout.

    Mirrors X-modaler's VisualBaseEmbedding (box embedding added before the activation).
    """

    def __init__(
        self,
        feat_dim: int,
        dim: int,
        *,
        use_boxes: bool = True,
        norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = nn.Linear(feat_dim, dim)
        self.boxes = nn.Linear(5, dim) if use_boxes else None
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        x = self.features(features)
        if self.boxes is not None:
            x = x + self.boxes(boxes)
        return self.dropout(self.norm(F.relu(x)))


def sample_tokens(logits: Tensor) -> Tensor:
    """One token per row drawn from softmax(logits) over the last axis (no grad)."""
    probs = logits.detach().float().softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])


def mix_in_predictions(input_ids: Tensor, predicted: Tensor, prob: float, pad_id: int) -> Tensor:
    """Scheduled sampling: input t >= 1 becomes `predicted[:, t - 1]` with probability `prob`.

    BOS and PAD inputs stay as they are; `predicted` [R, T] holds each position's prediction.
    """
    later = input_ids[:, 1:]
    swap = (torch.rand(later.shape, device=later.device) < prob) & (later != pad_id)
    return torch.cat([input_ids[:, :1], torch.where(swap, predicted[:, :-1], later)], dim=1)


def label_smoothed_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    smoothing: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean label-smoothed cross-entropy over the targets that are not `ignore_index`.

    The target word gets 1 - smoothing and every other word smoothing / (V - 1), as in
    X-modaler's LabelSmoothing; this value is its KL divergence plus the smoothed target's
    constant entropy, so the gradients are the same.
    """
    vocab = logits.shape[-1]
    log_probs = logits.float().log_softmax(-1)
    valid = targets != ignore_index
    target_lp = log_probs.gather(-1, targets.masked_fill(~valid, 0)[..., None]).squeeze(-1)
    other_lp = log_probs.sum(-1) - target_lp
    loss = -(1.0 - smoothing) * target_lp - smoothing / (vocab - 1) * other_lp
    return loss.masked_fill(~valid, 0.0).sum() / valid.sum().clamp_min(1)
