"""Step functions `step(engine, batch) -> dict[str, Tensor]`: where the tasks differ."""

from .captioning import scst_step, scst_time_split, xe_step

__all__ = ["scst_step", "scst_time_split", "xe_step"]
