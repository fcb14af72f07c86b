"""CIDEr-D (sigma 6, clipped, x10); a local `evaluate` module (loads offline)."""

import xmodaler_accel.metrics.hf_module as base


class CaptionCider(base.CaptionMetric):
    METRICS = ("cider",)
    DESCRIPTION = "CIDEr-D (sigma 6, clipped, x10), exactly as coco-caption computes it (PTB tokenisation, its result names)."
