"""Base class of the caption metrics shipped as local ``evaluate`` modules.

Each module under ``evaluate_modules/<name>/<name>.py`` subclasses :class:`CaptionMetric` and
only names the metrics it computes; :func:`load_caption_metric` loads one from the package's
own files, never from the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import evaluate

from .caption import DEFAULT_METRICS, score_captions

__all__ = ["MODULES", "CaptionMetric", "load_caption_metric"]

MODULE_DIR = Path(__file__).resolve().parent / "evaluate_modules"
MODULES = ("coco_caption", "caption_bleu", "caption_meteor", "caption_rouge", "caption_cider")

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta,
          Saurabh and Dollar, Piotr and Zitnick, C. Lawrence},
  journal={arXiv:1504.00325}, year={2015}
}
"""
_INPUTS = """
Args:
    predictions: one generated caption (str) per image.
    references: the image's reference captions (list of str), in the same order.
    metrics (optional): subset of ("bleu", "meteor", "rouge", "cider"); "spice" only warns.
Returns:
    coco-caption names: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (CIDEr-D).
"""


class CaptionMetric(evaluate.Metric):
    """coco-caption scores (PTB tokenisation, its result names) over the whole evaluated set."""

    METRICS: tuple[str, ...] = DEFAULT_METRICS
    DESCRIPTION = "Caption metrics computed exactly as coco-caption (pycocoevalcap) does."

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/tylin/coco-caption"],
        )

    def _compute(
        self, predictions: list[str], references: list[list[str]], metrics: Any = None
    ) -> dict[str, float]:
        preds = dict(enumerate(predictions))
        refs = {i: list(r) for i, r in enumerate(references)}
        return score_captions(preds, refs, tuple(metrics or self.METRICS))


def load_caption_metric(name: str = "coco_caption", **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` of one of :data:`MODULES` from this package's files (works offline)."""
    if name not in MODULES:
        raise ValueError(f"unknown caption metric module {name!r}; expected one of {MODULES}")
    return evaluate.load(str(MODULE_DIR / name), **kwargs)
