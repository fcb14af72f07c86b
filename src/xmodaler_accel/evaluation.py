"""Distributed evaluation without duplicates, and the eval output contract.

Padded distributed samplers repeat samples to even out the last batch (accelerate #125, #350,
#575). Every evaluation gathers (id, prediction) pairs from all processes, drops repeats by id and
checks that exactly the split's samples were seen before anything is scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object


class EvaluationCountError(RuntimeError):
    """The gathered predictions do not cover the split exactly once."""


def gather_predictions(
    accelerator: Any,
    ids: Sequence[Hashable],
    predictions: Sequence[Any],
    expected_ids: Sequence[Hashable] | int,
) -> dict[Hashable, Any]:
    """All processes' `{id: prediction}`, each id once, checked against the split (collective).

    `expected_ids` is the split's ids (checked as a set) or its size. A duplicate id with a
    different prediction is an error, since it means two processes disagree about one sample.
    """
    if len(ids) != len(predictions):
        raise ValueError(f"{len(ids)} ids but {len(predictions)} predictions on this process")
    pairs = list(zip(ids, predictions))
    gathered = gather_object(pairs) if accelerator.num_processes > 1 else pairs
    merged: dict[Hashable, Any] = {}
    for sample_id, prediction in gathered:
        if sample_id in merged and merged[sample_id] != prediction:
            raise EvaluationCountError(
                f"sample {sample_id!r} was predicted twice with different results: "
                f"{merged[sample_id]!r} vs {prediction!r}"
            )
        merged[sample_id] = prediction
    _check_coverage(merged, expected_ids)
    return merged


def _check_coverage(merged: dict, expected: Sequence[Hashable] | int) -> None:
    if isinstance(expected, int):
        if len(merged) != expected:
            raise EvaluationCountError(
                f"evaluation saw {len(merged)} distinct samples, the split has {expected}"
            )
        return
    expected_set = set(expected)
    missing = expected_set - merged.keys()
    extra = merged.keys() - expected_set
    if missing or extra:
        raise EvaluationCountError(
            f"evaluation covered the split wrongly: {len(missing)} missing "
            f"(e.g. {sorted(missing, key=str)[:5]}), {len(extra)} not in the split "
            f"(e.g. {sorted(extra, key=str)[:5]})"
        )


def write_eval_result(
    output_dir: str | os.PathLike, split: str, step: int, metrics: dict[str, float]
) -> Path:
    """Write `eval/<split>_step<N>.json` as `{"split", "step", "metrics"}` (atomically)."""
    path = Path(output_dir) / "eval" / f"{split}_step{step}.json"
    write_json_atomic(path, {"split": split, "step": step, "metrics": metrics})
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
