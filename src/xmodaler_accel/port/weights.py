"""X-modaler checkpoints in our captioners: `model.weights=<X-modaler .pth>`.

X-modaler's `TransformerEncoderDecoder` (BERT-style post-LN layers, `configs/image_caption/
transformer`) is our `TransformerCaptioner` with other parameter names, and its Up-Down
(`RnnAttEncoderDecoder` + `UpDownDecoder`) our `UpDownCaptioner`; `XMODALER_NAMES` is the one
table between their names and ours. Our fused projections take X-modaler's separate ones,
concatenated along the output axis in the order listed (query, key, value). X-modaler also saves
its sinusoid table (`token_embed.embeddings_pos.pe`); we compute it, so the file's table is
checked against ours and dropped. Keys the table does not use stay in the state dict under their
X-modaler names, so `checkpoint.load_weights` names them (an error unless loading non-strict).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import UserError

# our module -> X-modaler's, concatenated in this order; {i} = layer; each parameter of the module
# (weight, bias; an LSTM cell's weight_ih ...) takes the same parameter of X-modaler's modules.
XMODALER_NAMES: dict[str, tuple[str, ...]] = {
    "token_embed.embed": ("token_embed.embeddings",),
    "token_embed.norm": ("token_embed.embeddings_norm",),
    "visual_embed.features": ("visual_embed.embeddings",),
    "visual_embed.boxes": ("visual_embed.embeddings_pos",),  # VISUAL_EMBED.LOCATION_SIZE 5
    "visual_embed.norm": ("visual_embed.embeddings_norm",),
    "encoder_layers.{i}.attn.qkv": (
        "encoder.layers.{i}.attention.self.query",
        "encoder.layers.{i}.attention.self.key",
        "encoder.layers.{i}.attention.self.value",
    ),
    "encoder_layers.{i}.attn.out": ("encoder.layers.{i}.attention.output.dense",),
    "encoder_layers.{i}.norm1": ("encoder.layers.{i}.attention.output.LayerNorm",),
    "encoder_layers.{i}.ffn.0": ("encoder.layers.{i}.intermediate.dense",),
    "encoder_layers.{i}.ffn.3": ("encoder.layers.{i}.output.dense",),
    "encoder_layers.{i}.norm2": ("encoder.layers.{i}.output.LayerNorm",),
    "decoder_layers.{i}.self_attn.qkv": (
        "decoder.g_layers.{i}.self_attn.self.query",
        "decoder.g_layers.{i}.self_attn.self.key",
        "decoder.g_layers.{i}.self_attn.self.value",
    ),
    "decoder_layers.{i}.self_attn.out": ("decoder.g_layers.{i}.self_attn.output.dense",),
    "decoder_layers.{i}.norm1": ("decoder.g_layers.{i}.self_attn.output.LayerNorm",),
    "decoder_layers.{i}.cross_attn.query": ("decoder.g_layers.{i}.x_att.self.query",),
    "decoder_layers.{i}.cross_attn.key_value": (
        "decoder.g_layers.{i}.x_att.self.key",
        "decoder.g_layers.{i}.x_att.self.value",
    ),
    "decoder_layers.{i}.cross_attn.out": ("decoder.g_layers.{i}.x_att.output.dense",),
    "decoder_layers.{i}.norm2": ("decoder.g_layers.{i}.x_att.output.LayerNorm",),
    "decoder_layers.{i}.ffn.0": ("decoder.g_layers.{i}.intermediate.dense",),
    "decoder_layers.{i}.ffn.3": ("decoder.g_layers.{i}.output.dense",),
    "decoder_layers.{i}.norm3": ("decoder.g_layers.{i}.output.LayerNorm",),
    "predictor": ("predictor.logits",),
    # Up-Down (RnnAttEncoderDecoder + UpDownDecoder); embeddings and predictor as above.
    "att_lstm": ("decoder.lstm1",),
    "lang_lstm": ("decoder.lstm2",),
    "attention.query": ("decoder.att.w_h",),
    "attention.score": ("decoder.att.w_alpha",),
    "project_regions": ("decoder.p_att_feats",),
}
# X-modaler's stored sinusoid table: recomputed by our TokenEmbedding, so only checked.
XMODALER_POSITIONS = "token_embed.embeddings_pos.pe"


class XmodalerWeightsError(UserError, ValueError):
    """An X-modaler checkpoint our model cannot take; the message names the keys at fault."""


def looks_like_xmodaler(state: Mapping[str, object]) -> bool:
    """True for a state dict with X-modaler's encoder-decoder names (what its trainer saves)."""
    prefixes = ("decoder.g_layers.", "encoder.layers.", "decoder.lstm1.", "token_embed.embeddings")
    return any(key.startswith(prefixes) for key in state)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<leaf>\w+)")


_OURS = [(_pattern(ours), sources) for ours, sources in XMODALER_NAMES.items()]


def _sources(name: str) -> list[str] | None:
    """X-modaler names whose concatenation is our parameter `name` (None: not in the table)."""
    for pattern, sources in _OURS:
        if match := pattern.fullmatch(name):
            i, leaf = match.groupdict().get("i") or "", match["leaf"]
            return [f"{source.replace('{i}', i)}.{leaf}" for source in sources]
    return None


def sinusoid_table(length: int, dim: int) -> Tensor:
    """X-modaler's SinusoidEncoding rows 0..length-1 for its default base 10000 (the formula our
    TokenEmbedding computes): sin at even columns, cos at odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def _check_positions(pe: Tensor) -> None:
    table = pe.reshape(-1, pe.shape[-1]).float()
    ours = sinusoid_table(*table.shape)
    # float32 sin of positions up to 5000 differs by ~2.4e-4 between CPU kernels (SLEEF/AVX
    # variants); another base differs by ~1. Captions use only the first rows.
    if not torch.allclose(table, ours, atol=1e-3, rtol=0):
        raise XmodalerWeightsError(
            f"{XMODALER_POSITIONS}: this sinusoid table differs from ours (base 10000) by up to "
            f"{(table - ours).abs().max().item():.3g}; X-modaler derives the base from "
            "TOKEN_EMBED.POSITION_MAX_LEN, and only 5000 (base 10000) is supported"
        )


def from_xmodaler(state: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """`state` (X-modaler's names) renamed for `model` through `XMODALER_NAMES`.

    Every parameter of `model` the table maps takes its X-modaler tensors (concatenated); the
    ones whose sources are absent stay absent, and every X-modaler key no parameter used stays
    under its own name, so a strict `load_state_dict` reports both sides by name.
    """
    remaining = dict(state)
    if XMODALER_POSITIONS in remaining:
        _check_positions(remaining.pop(XMODALER_POSITIONS))
    out: dict[str, Tensor] = {}
    for name in model.state_dict():
        sources = _sources(name)
        if sources is None or not all(s in remaining for s in sources):
            continue
        parts = [remaining.pop(s) for s in sources]
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    out.update(remaining)
    return out
