"""BLEU-1..4 (closest reference length); a local `evaluate` module (loads offline)."""

import xmodaler_accel.metrics.hf_module as base


class CaptionBleu(base.CaptionMetric):
    METRICS = ("bleu",)
    DESCRIPTION = "BLEU-1..4 (closest reference length), exactly as coco-caption computes it (PTB tokenisation, its result names)."
