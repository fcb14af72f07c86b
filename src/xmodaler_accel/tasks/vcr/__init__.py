"""Visual commonsense reasoning: X-modaler's VCRTrainer (Q->A and QA->R in every step).

- `config`: the recipe's keys (`VCR_DEFAULTS`).
- `data`: one sub-task per item (`VCRTaskDataset`), candidates batched per item
  (`collate_choices`).
- `steps`: `vcr_step` (the QA->R batches come from a `second_loader.SecondLoader`).
- `evaluation`: Q->A, QA->R and Q->AR of a split.
"""

from .config import VCR_DEFAULTS, load_vcr_config
from .data import VCRTaskDataset, collate_choices, concat_choice_batches
from .evaluation import VCRSplit, evaluate_vcr, predict_choices
from .steps import choice_loss, vcr_step

__all__ = [
    "load_vcr_config",
    "VCR_DEFAULTS",
    "VCRSplit",
    "VCRTaskDataset",
    "choice_loss",
    "collate_choices",
    "concat_choice_batches",
    "evaluate_vcr",
    "predict_choices",
    "vcr_step",
]
