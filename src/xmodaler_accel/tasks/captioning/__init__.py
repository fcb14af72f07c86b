"""Image captioning: X-modaler's DefaultTrainer (XE), RLTrainer and RLBeamTrainer (SCST).

- `config`: the recipes' keys (`CAPTION_DEFAULTS`) and SCST's config precedence.
- `data`: images with captions (`CaptionDataset`), the XE batch (`collate_xe`), image batches.
- `model`: the configured captioner (`captioner_from_config`).
- `steps`: `xe_step`, `scst_step`.
- `reward`: the CIDEr-D reward over the training references.
- `evaluation`: beam-search evaluation with the coco-caption metrics (`CaptionEvaluator`).
- `hooks`: `SCSTTimeSplit`.
"""

from .config import CAPTION_DEFAULTS, load_caption_config, load_scst_config
from .data import CaptionDataset, collate_xe, image_collate
from .evaluation import CaptionEvaluator
from .hooks import SCSTTimeSplit
from .model import captioner_from_config, feature_dim
from .reward import build_reward_scorer, training_references
from .steps import BASELINES, SAMPLERS, scst_step, xe_step

__all__ = [
    "BASELINES",
    "CAPTION_DEFAULTS",
    "SAMPLERS",
    "SCSTTimeSplit",
    "CaptionDataset",
    "CaptionEvaluator",
    "build_reward_scorer",
    "captioner_from_config",
    "collate_xe",
    "feature_dim",
    "image_collate",
    "load_caption_config",
    "load_scst_config",
    "scst_step",
    "training_references",
    "xe_step",
]
