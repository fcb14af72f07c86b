"""Caption metrics with coco-caption's numbers: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (SPICE: no).

``score_captions`` tokenises like coco-caption (PTB, lower case, punctuation dropped; in Python,
see :mod:`.ptb_tokenizer`) and returns coco-caption's result names. BLEU and CIDEr-D run on the
vectorised n-gram engine of :mod:`xmodaler_accel.scoring` (document frequencies from the
evaluated references, as coco-caption does), ROUGE-L in Python; only METEOR needs Java.
SPICE needs Stanford CoreNLP models that cannot be downloaded here: asking for it gives a warning
and no ``SPICE`` entry, never a crashed evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from ..scoring.bleu import bleu_counts, corpus_bleu
from ..scoring.cider import cider_from_stats
from ..scoring.corpus import RefCorpus
from ..scoring.ngrams import pad_sequences
from .meteor import MeteorUnavailable, meteor, meteor_missing
from .ptb_tokenizer import tokenize_captions, tokenize_lines
from .rouge import rouge_l

__all__ = ["DEFAULT_METRICS", "SPICE_UNAVAILABLE", "check_metrics", "score_captions"]

DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
SPICE_UNAVAILABLE = (
    "SPICE unavailable: it needs the Stanford CoreNLP 3.6.0 models, which cannot be downloaded "
    "here; SPICE is left out of the results"
)

Gts = dict[Hashable, list[str]]
Res = dict[Hashable, str]


def _word_ids(gts: Gts, res: Res) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Words (coco-caption's ``str.split()``) as integer ids, per image in ``gts`` order."""
    vocab: dict[str, int] = {}

    def ids(text: str) -> list[int]:
        return [vocab.setdefault(w, len(vocab)) for w in text.split()]

    refs = [[ids(r) for r in gts[k]] for k in gts]
    return refs, [ids(res[k]) for k in gts]


def _ngram_scores(gts: Gts, res: Res, want_bleu: bool, want_cider: bool) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D from one n-gram join of every candidate with its references."""
    refs, cands = _word_ids(gts, res)
    corpus = RefCorpus.build(refs, eos_id=None, include_eos=False)
    stats = corpus.match(np.arange(len(refs)), pad_sequences(cands))
    out: dict[str, float] = {}
    if want_bleu:
        for k, value in enumerate(corpus_bleu(bleu_counts(stats, corpus))):
            out[f"Bleu_{k + 1}"] = value
    if want_cider:
        out["CIDEr"] = float(np.mean(cider_from_stats(stats, corpus)))
    return out


def _rouge(gts: Gts, res: Res) -> dict[str, float]:
    return {"ROUGE_L": rouge_l(gts, res)[0]}


def _meteor(gts: Gts, res: Res) -> dict[str, float]:
    return {"METEOR": meteor(gts, res)[0]}


_OTHER: dict[str, Callable[[Gts, Res], dict[str, float]]] = {"rouge": _rouge, "meteor": _meteor}
_KNOWN = ("bleu", "meteor", "rouge", "cider", "spice")


def _names(metrics: Sequence[str]) -> list[str]:
    """Metric names in lower case; an unknown one is a ValueError naming it."""
    names = [str(m).lower() for m in metrics]
    unknown = [m for m in names if m not in _KNOWN]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; expected some of {_KNOWN}")
    return names


def check_metrics(metrics: Sequence[str] = DEFAULT_METRICS) -> None:
    """Raise before any scoring if `metrics` cannot all be computed here: ValueError for an
    unknown name, :class:`MeteorUnavailable` (saying what to install) for METEOR without Java or
    pycocoevalcap's jar. Run it at start: otherwise the first evaluation fails, hours in."""
    if "meteor" in _names(metrics):
        problem = meteor_missing()
        if problem:
            raise MeteorUnavailable(problem)


def _check(predictions: Mapping, references: Mapping, metrics: Sequence[str]) -> list[str]:
    """Metric names in lower case; errors name the image ids or metric at fault."""
    names = _names(metrics)
    if not references:
        raise ValueError("no captions to score")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references must cover the same image ids: "
            f"{len(missing)} without a prediction (e.g. {missing[:3]}), "
            f"{len(extra)} without references (e.g. {extra[:3]})"
        )
    empty = [k for k, refs in references.items() if isinstance(refs, str) or not len(refs)]
    if empty:
        raise ValueError(f"references must be non-empty lists of captions; see image {empty[0]!r}")
    return names


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    tokenize: bool = True,
) -> dict[str, float]:
    """coco-caption scores of ``predictions[image_id]`` against ``references[image_id]``.

    ``metrics`` picks among "bleu" (``Bleu_1``..``Bleu_4``), "meteor" (``METEOR``, needs Java),
    "rouge" (``ROUGE_L``), "cider" (``CIDEr``, i.e. CIDEr-D) and "spice" (unavailable: warns).
    ``tokenize=False`` takes captions that are already coco-tokenised.
    """
    names = _check(predictions, references, metrics)
    if tokenize:
        gts = tokenize_captions({k: list(v) for k, v in references.items()})
        pred_keys = list(predictions)
        res = dict(zip(pred_keys, tokenize_lines([predictions[k] for k in pred_keys])))
    else:
        gts, res = {k: list(v) for k, v in references.items()}, dict(predictions)
    res = {k: res[k] for k in gts}
    out: dict[str, float] = {}
    if "bleu" in names or "cider" in names:
        out.update(_ngram_scores(gts, res, "bleu" in names, "cider" in names))
    for name in names:
        if name in _OTHER:
            out.update(_OTHER[name](gts, res))
    if "spice" in names:
        warnings.warn(SPICE_UNAVAILABLE, RuntimeWarning, stacklevel=2)
    order = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    return {k: out[k] for k in order if k in out}
