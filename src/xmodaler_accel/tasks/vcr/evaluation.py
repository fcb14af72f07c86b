"""VCR evaluation: Q->A, QA->R and Q->AR of a split, split across processes without duplicates.

Each sub-task's items are cut into a fixed grid of batches (the same for any number of processes)
and batch `c` runs on process `c % world_size`, so every batch holds the same items, and so the
same padding, whatever the world size: predictions do not depend on the number of processes.
`gather_predictions` then collects one prediction per item and checks the split is covered once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate.utils import send_to_device
from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from ...data import ArrowColumns
from ...evaluation import gather_predictions
from ...metrics.vcr import vcr_accuracy
from ...models.vcr import MODEL_INPUTS
from ...progress import progress_bar
from ...writers import wandb_tracker
from .data import VCRTaskDataset


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
    desc: str = "eval",
) -> list[int]:
    """The chosen candidate of every item of `dataset`, in order (collective); `desc` names
    the progress bar."""
    ids: list[int] = []
    predictions: list[int] = []
    batches = progress_bar(
        my_batches(accelerator, len(dataset), max(1, batch_size)),
        desc=desc,
        unit="batch",
        main_process=accelerator.is_local_main_process,
    )
    for rows in batches:
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
    step: int | None = None,
) -> dict[str, dict[str, float]]:
    """`{split: {"Q->A", "QA->R", "Q->AR"}}` (collective; call with the model in eval mode).
    When W&B is logging, also the table `<split>/samples` of the first items, at `step`."""
    results: dict[str, dict[str, float]] = {}
    predict = partial(predict_choices, accelerator, model, batch_size=batch_size, collate=collate)
    for split in splits:
        answers = predict(split.qa, desc=f"eval {split.name} Q->A")
        rationales = predict(split.qar, desc=f"eval {split.name} QA->R")
        results[split.name] = vcr_accuracy(
            answers, split.qa.labels(), rationales, split.qar.labels()
        )
        log_samples(accelerator, split, answers, rationales, step)
    return results


SAMPLE_COLUMNS = [
    "annot_id",
    "question",
    "answers",
    "predicted_answer",
    "correct_answer",
    "predicted_rationale",
    "correct_rationale",
]


def sample_rows(
    split: VCRSplit, answers: list[int], rationales: list[int], count: int = 16
) -> list[list[str]]:
    """The first `count` items: question, numbered answers, and the predicted and correct
    answer and rationale as text (empty where the split is unlabeled). The rationale was
    chosen given the correct answer (QA->R), as the metric scores it."""
    items = range(min(count, len(split.qa)))
    return [sample_row(split.qa.questions, i, answers[i], rationales[i]) for i in items]


def sample_row(questions: ArrowColumns, item: int, answer: int, rationale: int) -> list[str]:
    """One `SAMPLE_COLUMNS` row of question table row `item` and its predicted choices."""

    def value(name: str) -> Any:
        return questions.value(name, item)

    answers = [" ".join(words) for words in value("answer_choices")]
    reasons = [" ".join(words) for words in value("rationale_choices")]
    right_answer, right_rationale = value("answer_label"), value("rationale_label")
    return [
        value("annot_id"),
        " ".join(value("question")),
        " | ".join(f"{k}: {text}" for k, text in enumerate(answers)),
        answers[answer],
        answers[right_answer] if right_answer >= 0 else "",
        reasons[rationale],
        reasons[right_rationale] if right_rationale >= 0 else "",
    ]


def log_samples(
    accelerator: Any, split: VCRSplit, answers: list[int], rationales: list[int], step: int | None
) -> None:
    """Log `<split>/samples` to W&B from the main process (predictions are already gathered)."""
    tracker = wandb_tracker(accelerator)
    if tracker is None or not accelerator.is_main_process:
        return
    tracker.log_table(
        f"{split.name}/samples",
        columns=SAMPLE_COLUMNS,
        data=sample_rows(split, answers, rationales),
        step=step,
    )
