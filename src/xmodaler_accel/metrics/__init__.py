"""Evaluation metrics. Captioning: coco-caption's BLEU/METEOR/ROUGE-L/CIDEr-D without its Java
tokeniser (:func:`score_captions`, and the same as local ``evaluate`` modules through
:func:`load_caption_metric`)."""

from .caption import DEFAULT_METRICS, SPICE_UNAVAILABLE, score_captions
from .ptb_tokenizer import tokenize, tokenize_captions, tokenize_lines

__all__ = [
    "DEFAULT_METRICS",
    "SPICE_UNAVAILABLE",
    "load_caption_metric",
    "score_captions",
    "tokenize",
    "tokenize_captions",
    "tokenize_lines",
]


def load_caption_metric(name: str = "coco_caption", **kwargs):
    """Load a caption metric as an ``evaluate`` module from this package (see ``hf_module``)."""
    from .hf_module import load_caption_metric as load

    return load(name, **kwargs)
