"""BLEU-1..4, METEOR, ROUGE-L and CIDEr-D; a local `evaluate` module (loads offline)."""

import xmodaler_accel.metrics.hf_module as base


class CocoCaption(base.CaptionMetric):
    METRICS = ("bleu", "meteor", "rouge", "cider")
    DESCRIPTION = "BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, exactly as coco-caption computes it (PTB tokenisation, its result names)."
