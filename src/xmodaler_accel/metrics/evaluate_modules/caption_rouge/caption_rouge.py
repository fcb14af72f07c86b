"""ROUGE-L (beta 1.2); a local `evaluate` module (loads offline)."""

import xmodaler_accel.metrics.hf_module as base


class CaptionRouge(base.CaptionMetric):
    METRICS = ("rouge",)
    DESCRIPTION = "ROUGE-L (beta 1.2), exactly as coco-caption computes it (PTB tokenisation, its result names)."
