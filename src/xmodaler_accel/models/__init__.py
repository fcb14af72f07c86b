"""Models: the captioners (Transformer, Up-Down) behind one contract, and their shared pieces;
the retrieval, VCR and pretraining models (built from `transformers` BERT parts).

`build_captioner("transformer" | "updown", vocab_size=..., feat_dim=..., **sizes)` builds one;
see `CaptionModel` for the interface decoding, steps and recipes use.
"""

from typing import Any

from ..masking import IGNORE_INDEX, masked_mean
from .captioning import (
    CaptionModel,
    DecoderState,
    EncoderOutput,
    TokenEmbedding,
    VisualEmbedding,
    label_smoothed_loss,
)
from .pretrain import TDENPretrainModel, build_pretrain_model, export_finetune_weights
from .retrieval import build_retrieval_model
from .transformer import TransformerCaptioner
from .updown import UpDownCaptioner
from .vcr import VCRModel, build_vcr_model

CAPTIONERS: dict[str, type[CaptionModel]] = {
    "transformer": TransformerCaptioner,
    "updown": UpDownCaptioner,
}


def build_captioner(kind: str, *, vocab_size: int, feat_dim: int, **sizes: Any) -> CaptionModel:
    """A captioner of `kind` ("transformer" or "updown"); `sizes` go to its constructor."""
    if kind not in CAPTIONERS:
        raise ValueError(f"unknown captioner kind {kind!r}; expected one of {sorted(CAPTIONERS)}")
    return CAPTIONERS[kind](vocab_size, feat_dim, **sizes)


__all__ = [
    "CAPTIONERS",
    "IGNORE_INDEX",
    "CaptionModel",
    "DecoderState",
    "EncoderOutput",
    "TDENPretrainModel",
    "TokenEmbedding",
    "TransformerCaptioner",
    "UpDownCaptioner",
    "VCRModel",
    "VisualEmbedding",
    "build_captioner",
    "build_pretrain_model",
    "build_retrieval_model",
    "build_vcr_model",
    "export_finetune_weights",
    "label_smoothed_loss",
    "masked_mean",
]
