"""Step functions `step(engine, batch) -> dict[str, Tensor]`: where the tasks differ."""

from .captioning import scst_step, scst_time_split, xe_step
from .pretrain import pretrain_step
from .retrieval import itm_hard_negative_step, itm_step, retrieval_step
from .vcr import vcr_step

__all__ = [
    "itm_hard_negative_step",
    "itm_step",
    "pretrain_step",
    "retrieval_step",
    "scst_step",
    "scst_time_split",
    "vcr_step",
    "xe_step",
]
