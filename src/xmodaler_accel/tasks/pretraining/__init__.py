"""Vision-language pretraining: X-modaler's TDENPretrainer (MLM, MRM, ITM, generation).

- `config`: the recipe's keys (`PRETRAIN_DEFAULTS`).
- `data`: masked (image, caption) pairs (`PretrainPairs`) and their batch (`collate_pretrain`).
- `steps`: `pretrain_step` with TDEN's two stages.
- `evaluation`: the accuracy of every head (`pretrain_metrics`).
The weights each fine-tuning recipe takes are exported by `models.pretrain.export_finetune_weights`.
"""

from .config import PRETRAIN_DEFAULTS, load_pretrain_config
from .data import PretrainPairs, caption_specials, collate_pretrain
from .evaluation import pretrain_metrics
from .steps import pretrain_step

__all__ = [
    "load_pretrain_config",
    "PRETRAIN_DEFAULTS",
    "PretrainPairs",
    "caption_specials",
    "collate_pretrain",
    "pretrain_metrics",
    "pretrain_step",
]
