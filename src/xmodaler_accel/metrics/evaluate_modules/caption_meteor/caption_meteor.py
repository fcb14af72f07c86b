"""METEOR 1.5 (Java, pycocoevalcap jar); a local `evaluate` module (loads offline)."""

import xmodaler_accel.metrics.hf_module as base


class CaptionMeteor(base.CaptionMetric):
    METRICS = ("meteor",)
    DESCRIPTION = "METEOR 1.5 (Java, pycocoevalcap jar), exactly as coco-caption computes it (PTB tokenisation, its result names)."
