"""A W&B table of retrieval samples: the top captions of a split's first images.

Only the sampled images' score rows are kept while the evaluation streams its blocks, so the cost
is a few rows of the score matrix and one small gather, whatever the split's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...writers import wandb_tracker

if TYPE_CHECKING:
    from .evaluation import RetrievalSplit

SAMPLE_COLUMNS = ["image_id", "rank", "caption", "score", "ground_truth", "references"]


class TopCaptions:
    """The `k` best-scored captions of a few sampled images, kept from score blocks as they
    stream by; `gather` merges what every process saw (collective)."""

    def __init__(self, images: int, num_captions: int, k: int = 5, device: Any = "cpu") -> None:
        self.images = torch.arange(images)  # the sampled image rows
        self.k = min(k, num_captions)
        self.scores = torch.full((images, num_captions), float("-inf"), device=device)

    @classmethod
    def for_split(cls, split: RetrievalSplit, device: Any, images: int = 16) -> TopCaptions:
        return cls(min(images, split.num_images), split.num_captions, device=device)

    def add_block(self, images: torch.Tensor, captions: torch.Tensor, scores: torch.Tensor) -> None:
        """Scores [i, t] of image rows `images` against caption rows `captions`."""
        rows, slots = (images.cpu()[:, None] == self.images[None, :]).nonzero(as_tuple=True)
        if len(rows) == 0:  # decided on CPU tensors: no device sync
            return
        device = self.scores.device
        columns = captions.to(device)[None, :]
        self.scores[slots.to(device)[:, None], columns] = scores[rows.to(scores.device)].float()

    def gather(self, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, caption rows) [images, k] of each sampled image's best captions, over every
        process (collective). Captions never scored keep -inf."""
        values, rows = self.scores.topk(self.k, dim=1)
        world = accelerator.num_processes
        if world > 1:
            # Each image's row was scored on one process; the others hold -inf: merge by top-k.
            def side_by_side(t: torch.Tensor) -> torch.Tensor:
                t = accelerator.gather(t.contiguous()).view(world, *t.shape)
                return t.permute(1, 0, 2).reshape(len(self.images), -1)

            values, rows = side_by_side(values), side_by_side(rows)
            values, best = values.topk(self.k, dim=1)
            rows = rows.gather(1, best)
        return values.cpu(), rows.cpu()


def sample_rows(split: RetrievalSplit, scores: torch.Tensor, rows: torch.Tensor) -> list[list[Any]]:
    """One table row per (sampled image, retrieved caption): rank from 1, the caption, its score,
    whether it is one of the image's captions, and the image's reference captions."""
    table = []
    for image, (image_scores, image_rows) in enumerate(zip(scores.tolist(), rows.tolist())):
        image_id = split.images.columns.value("image_id", image)
        references = " | ".join(split.captions_of(image))
        for rank, (score, caption) in enumerate(zip(image_scores, image_rows), start=1):
            if score == float("-inf"):  # outside the re-ranked candidates
                break
            truth = int(split.caption_image[caption]) == image
            table.append([image_id, rank, split.caption_text(caption), score, truth, references])
    return table


def log_samples(
    accelerator: Any, split: RetrievalSplit, top: TopCaptions | None, step: int | None
) -> None:
    """Log `<split>/samples` to W&B (collective: every process gathers, the main one logs)."""
    if top is None:
        return
    scores, rows = top.gather(accelerator)
    tracker = wandb_tracker(accelerator)
    if accelerator.is_main_process and tracker is not None:
        data = sample_rows(split, scores, rows)
        tracker.log_table(f"{split.name}/samples", columns=SAMPLE_COLUMNS, data=data, step=step)
