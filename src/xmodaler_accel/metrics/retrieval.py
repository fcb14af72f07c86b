"""Image-text retrieval recall (R@K) with the Flickr30k protocol, computed block by block.

Image-to-text (i2t): an image's query succeeds at K when one of its captions ranks in the top K.
Text-to-image (t2i): a caption's only positive is its image. Ties count against the model: a
negative that scores the same as the best positive ranks above it, so a constant scorer gets 0,
not 100. Ranks are only needed up to max(K), so each query keeps its best positive score and its
`max(K)` highest negative scores; blocks of the score matrix stream through and the full matrix
never has to exist (LAVIS #84, open_clip #11). Per-process states merge exactly (max and top-k
are order-free), so a distributed evaluation gives the same numbers as a single process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)


class TopKRanks:
    """Per query: the best positive score and the `k` highest negative scores seen so far."""

    def __init__(self, num_queries: int, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self.positive = torch.full((num_queries,), float("-inf"), device=device)
        self.negatives = torch.full((num_queries, k), float("-inf"), device=device)

    def update(self, queries: torch.Tensor, scores: torch.Tensor, positive: torch.Tensor) -> None:
        """Fold in `scores` [q, c] of candidates for `queries` [q]; `positive` [q, c] is bool."""
        if torch.isnan(scores).any():
            raise ValueError("retrieval scores contain NaN; the model diverged")
        scores = scores.float().to(self.positive.device)
        positive = positive.to(self.positive.device)
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1)
        self.positive[queries] = torch.maximum(self.positive[queries], best)
        negatives = scores.masked_fill(positive, float("-inf"))
        self.negatives[queries] = self._top(torch.cat([self.negatives[queries], negatives], 1))

    def merge(self, positive: torch.Tensor, negatives: torch.Tensor) -> None:
        """Fold in another state of the same queries (e.g. gathered from another process)."""
        self.positive = torch.maximum(self.positive, positive.to(self.positive.device))
        self.negatives = self._top(torch.cat([self.negatives, negatives.to(self.negatives)], 1))

    def _top(self, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[1])
        top = scores.topk(k, dim=1).values
        if k < self.k:
            top = torch.nn.functional.pad(top, (0, self.k - k), value=float("-inf"))
        return top

    def ranks(self) -> torch.Tensor:
        """0-based rank of each query's best positive, capped at `k` (ties count against it)."""
        return (self.negatives >= self.positive[:, None]).sum(dim=1)


def recall_from_ranks(
    i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """`i2t_R@K`, `t2i_R@K` in percent and their sum `rsum`."""
    metrics: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = round(100.0 * (ranks < k).double().mean().item(), 4)
    metrics["rsum"] = round(sum(metrics.values()), 4)
    return metrics


class RetrievalRanks:
    """Both directions of one split: images x captions, `caption_image[t]` the image of caption t."""

    def __init__(
        self, caption_image: torch.Tensor, num_images: int, ks: Sequence[int] = DEFAULT_KS
    ) -> None:
        self.ks = tuple(ks)
        self.caption_image = caption_image.long().cpu()
        self.i2t = TopKRanks(num_images, max(self.ks))
        self.t2i = TopKRanks(len(caption_image), max(self.ks))

    def add_block(self, images: torch.Tensor, captions: torch.Tensor, scores: torch.Tensor) -> None:
        """Scores [i, t] of image rows `images` against caption rows `captions`."""
        images, captions, scores = images.cpu(), captions.cpu(), scores.detach().cpu()
        positive = self.caption_image[captions][None, :] == images[:, None]
        self.i2t.update(images, scores, positive)
        self.t2i.update(captions, scores.T, positive.T)

    def add_i2t(self, images: torch.Tensor, scores: torch.Tensor) -> None:
        """Scores [i, T] of image rows against every caption (-inf for uncandidates)."""
        images, scores = images.cpu(), scores.detach().cpu()
        positive = self.caption_image[None, :] == images[:, None]
        self.i2t.update(images, scores, positive)

    def add_t2i(self, captions: torch.Tensor, scores: torch.Tensor) -> None:
        """Scores [t, I] of caption rows against every image (-inf for uncandidates)."""
        captions, scores = captions.cpu(), scores.detach().cpu()
        image_ids = torch.arange(scores.shape[1])
        positive = image_ids[None, :] == self.caption_image[captions][:, None]
        self.t2i.update(captions, scores, positive)

    def state(self) -> list[torch.Tensor]:
        """Tensors to gather from every process and give to `merge`."""
        return [self.i2t.positive, self.i2t.negatives, self.t2i.positive, self.t2i.negatives]

    def merge(self, state: Sequence[torch.Tensor]) -> None:
        self.i2t.merge(state[0], state[1])
        self.t2i.merge(state[2], state[3])

    def metrics(self) -> dict[str, float]:
        return recall_from_ranks(self.i2t.ranks(), self.t2i.ranks(), self.ks)


def recall_at_k(
    scores: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """R@K of a full [images, captions] score matrix; `caption_image[t]` is caption t's image."""
    ranks = RetrievalRanks(caption_image, scores.shape[0], ks)
    ranks.add_block(torch.arange(scores.shape[0]), torch.arange(scores.shape[1]), scores)
    return ranks.metrics()
