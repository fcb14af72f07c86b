"""VCR accuracy: `Q->A`, `QA->R` and `Q->AR`, in percent (the VCR leaderboard's unit).

QA->R is scored with the right answer given (VCR's protocol); an item counts for Q->AR only when
both its predicted answer and its predicted rationale are right, so chance is 1/16 = 6.25%.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VCR_METRICS = ("Q->A", "QA->R", "Q->AR")


def vcr_accuracy(
    answer_pred: Sequence[int],
    answer_label: Sequence[int],
    rationale_pred: Sequence[int],
    rationale_label: Sequence[int],
) -> dict[str, float]:
    """`{"Q->A", "QA->R", "Q->AR"}` in percent over items given in the same order in all four."""
    arrays = [np.asarray(x, dtype=np.int64) for x in (answer_pred, answer_label)]
    arrays += [np.asarray(x, dtype=np.int64) for x in (rationale_pred, rationale_label)]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"predictions and labels differ in length: {[len(a) for a in arrays]}")
    if not len(arrays[0]):
        raise ValueError("no items to score")
    if (arrays[1] < 0).any() or (arrays[3] < 0).any():
        raise ValueError("some items have no label (-1): VCR test labels are not public")
    answer_right = arrays[0] == arrays[1]
    rationale_right = arrays[2] == arrays[3]
    values = (answer_right, rationale_right, answer_right & rationale_right)
    return {name: round(100.0 * float(v.mean()), 4) for name, v in zip(VCR_METRICS, values)}
