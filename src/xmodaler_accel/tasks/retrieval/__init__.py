"""Image-text retrieval: X-modaler's RetrievalTrainer (two-stream) and
SingleStreamRetrievalTrainer[HardNegatives] (single-stream ITM).

- `config`: the recipe's keys (`RETRIEVAL_DEFAULTS`).
- `steps`: `retrieval_step` (contrastive), `itm_step` / `itm_hard_negative_step`.
- `evaluation`: chunked, distributed R@K over every image against every caption.
The data view is the shared pair view (`data.PairDataset`, `data.collate_pairs`).
"""

from .config import RETRIEVAL_DEFAULTS, load_retrieval_config
from .evaluation import EvalSettings, RetrievalSplit, evaluate_retrieval
from .steps import itm_hard_negative_step, itm_step, retrieval_step

__all__ = [
    "load_retrieval_config",
    "RETRIEVAL_DEFAULTS",
    "EvalSettings",
    "RetrievalSplit",
    "evaluate_retrieval",
    "itm_hard_negative_step",
    "itm_step",
    "retrieval_step",
]
