"""VCR evaluation: Q->A, QA->R and Q->AR of a split, split across processes without duplicates.

Each sub-task's items are cut into a fixed grid of batches (the same for any number of processes)
and batch `c` runs on process `c % world_size`, so every batch holds the same items, and so the
same padding, whatever the world size: predictions do not depend on the number of processes.
`gather_predictions` then collects one prediction per item and checks the split is covered once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device
from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from ...evaluation import gather_predictions
from ...metrics.vcr import vcr_accuracy
from ...models.vcr import MODEL_INPUTS
from .data import VCRTaskDataset

logger = logging.getLogger(__name__)


@dataclass
class VCRSplit:
    """A split's Q->A and QA->R views (same items, same order)."""

    name: str
    qa: VCRTaskDataset
    qar: VCRTaskDataset

    @classmethod
    def from_dict(
        cls,
        data: DatasetDict,
        name: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length_qa: int = 38,
        max_length_qar: int = 66,
    ) -> VCRSplit:
        """Questions `data[f"vcr_{name}"]` over regions `data[name]`."""
        qa = VCRTaskDataset.from_dict(data, name, tokenizer, "qa", max_length=max_length_qa)
        qar = VCRTaskDataset.from_dict(data, name, tokenizer, "qar", max_length=max_length_qar)
        return cls(name, qa, qar)


def my_batches(accelerator: Any, total: int, batch_size: int) -> list[list[int]]:
    """This process's share of the fixed batch grid over `range(total)`."""
    grid = [list(range(s, min(s + batch_size, total))) for s in range(0, total, batch_size)]
    return grid[accelerator.process_index :: accelerator.num_processes]


@torch.no_grad()
def predict_choices(
    accelerator: Any,
    model: torch.nn.Module,
    dataset: VCRTaskDataset,
    *,
    batch_size: int,
    collate: Callable[[list], dict[str, Any]],
) -> list[int]:
    """The chosen candidate of every item of `dataset`, in order (collective)."""
    ids: list[int] = []
    predictions: list[int] = []
    for rows in my_batches(accelerator, len(dataset), max(1, batch_size)):
        batch = send_to_device(collate([dataset[i] for i in rows]), accelerator.device)
        logits = model(**{k: batch[k] for k in MODEL_INPUTS})
        ids.extend(rows)
        predictions.extend(logits.argmax(dim=1).tolist())
    merged = gather_predictions(accelerator, ids, predictions, len(dataset))
    return [merged[i] for i in range(len(dataset))]


def evaluate_vcr(
    accelerator: Any,
    model: torch.nn.Module,
    splits: Sequence[VCRSplit],
    *,
    batch_size: int,
    collate: Callable[[list], dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """`{split: {"Q->A", "QA->R", "Q->AR"}}` (collective; call with the model in eval mode)."""
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        answers = predict_choices(
            accelerator, model, split.qa, batch_size=batch_size, collate=collate
        )
        rationales = predict_choices(
            accelerator, model, split.qar, batch_size=batch_size, collate=collate
        )
        results[split.name] = vcr_accuracy(
            answers, split.qa.labels(), rationales, split.qar.labels()
        )
        logger.info("VCR %s (%d items): %s", split.name, len(split.qa), results[split.name])
    return results
