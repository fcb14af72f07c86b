"""Retrieval evaluation: every image of a split against every caption, in bounded memory.

Work is cut into a fixed grid of chunks (the same whatever the number of processes) and chunk
`c` runs on process `c % world_size`, so no pair is scored twice and the numbers are identical
for any number of processes. Two-stream models embed each image and caption once and take
similarities chunk by chunk; single-stream models score every (image, caption) pair, or only
the top-k candidates of a two-stream model (`rerank_k`, as ALBEF and BLIP evaluate). Score blocks
stream into `RetrievalRanks`, so the [images, captions] matrix is never held (LAVIS #84).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ...data import ImageDataset, collate_images, pad_ids
from ...metrics.retrieval import DEFAULT_KS, RetrievalRanks
from ...models.retrieval import TwoStreamRetrieval
from ...progress import progress_bar
from ...writers import wandb_tracker
from .samples import TopCaptions, log_samples
from .steps import clip_inputs

logger = logging.getLogger(__name__)


@dataclass
class RetrievalSplit:
    """A split's images (regions read on demand) and all its captions, tokenised once."""

    name: str
    images: ImageDataset
    input_ids: torch.Tensor  # [T, L]
    attention_mask: torch.Tensor  # [T, L]
    caption_image: torch.Tensor  # [T]: image row of each caption (Flickr30k protocol)

    @classmethod
    def from_table(
        cls,
        name: str,
        table: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 40,
        max_images: int = 0,
    ) -> RetrievalSplit:
        """The first `max_images` images (0: all) of an image table and their captions."""
        if 0 < max_images < len(table):
            table = table.select(range(max_images))
        images = ImageDataset(table)
        per_image = [images.columns.value("captions", row) for row in range(len(images))]
        captions = [caption for row in per_image for caption in row]
        encoded = tokenizer(captions, truncation=True, max_length=max_length)["input_ids"]
        ids, mask = pad_ids([np.asarray(e) for e in encoded], pad_id=tokenizer.pad_token_id or 0)
        owner = torch.repeat_interleave(
            torch.arange(len(per_image)), torch.tensor([len(c) for c in per_image])
        )
        return cls(name, images, ids, mask, owner)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.caption_image)

    def captions_of(self, image: int) -> list[str]:
        """The captions of image row `image`, as the table holds them."""
        return self.images.columns.value("captions", image)

    def caption_text(self, row: int) -> str:
        """The text of caption row `row` (captions are listed image by image)."""
        image = int(self.caption_image[row])
        first = int(torch.searchsorted(self.caption_image, image))
        return self.captions_of(image)[row - first]

    def regions(self, rows: Sequence[int], device: Any, max_feat_num: int) -> dict[str, Any]:
        """Padded regions of image rows `rows` on `device`."""
        batch = collate_images([self.images[int(r)] for r in rows], max_feat_num=max_feat_num)
        return {k: batch[k].to(device) for k in ("features", "boxes", "region_mask")}

    def texts(self, rows: torch.Tensor, device: Any) -> dict[str, torch.Tensor]:
        """Token ids and masks of caption rows `rows`, trimmed to their longest caption."""
        batch = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}
        return {k: v.to(device) for k, v in clip_inputs(batch).items()}


@dataclass
class EvalSettings:
    """Chunk sizes and options of one evaluation (from `eval.batch_size` and `retrieval:`)."""

    batch_size: int = 64  # images or captions per encoder batch; pairs per single-stream batch
    image_chunk: int = 8  # images per single-stream block (x batch_size // image_chunk captions)
    similarity_chunk: int = 256  # image rows per two-stream similarity block
    max_feat_num: int = 50
    rerank_k: int = 0  # > 0: single-stream scores only a two-stream model's top-k
    ks: tuple[int, ...] = DEFAULT_KS


def my_chunks(accelerator: Any, total: int, size: int) -> list[torch.Tensor]:
    """This process's share of the fixed chunk grid over `range(total)`."""
    chunks = list(torch.arange(total).split(max(1, size)))
    return chunks[accelerator.process_index :: accelerator.num_processes]


def chunks_bar(accelerator: Any, chunks: list[torch.Tensor], desc: str, unit: str = "batch"):
    """`chunks` with a progress bar on the local main process (its share stands for all)."""
    return progress_bar(
        chunks, desc=desc, unit=unit, main_process=accelerator.is_local_main_process
    )


def all_rows(
    accelerator: Any, rows: torch.Tensor, values: torch.Tensor, total: int
) -> torch.Tensor:
    """Every process's rows [total, ...] (collective); checks each row came from exactly one."""
    full = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=accelerator.device)
    seen = torch.zeros(total, dtype=torch.long, device=accelerator.device)
    full[rows.to(full.device)] = values.to(full.device)
    seen[rows.to(full.device)] = 1
    if accelerator.num_processes > 1:
        full, seen = accelerator.reduce(full, "sum"), accelerator.reduce(seen, "sum")
    if not bool((seen == 1).all()):
        raise RuntimeError(f"evaluation rows not covered exactly once: counts {seen.unique()}")
    return full


def merge_ranks(
    accelerator: Any, ranks: RetrievalRanks, split: RetrievalSplit, ks
) -> RetrievalRanks:
    """The union of every process's partial ranks (collective, exact)."""
    if accelerator.num_processes == 1:
        return ranks
    merged = RetrievalRanks(split.caption_image, split.num_images, ks)
    world = accelerator.num_processes
    gathered = [accelerator.gather(t.to(accelerator.device)) for t in ranks.state()]
    for p in range(world):
        merged.merge([g.view(world, -1, *g.shape[1:])[p].cpu() for g in gathered])
    return merged


@torch.no_grad()
def embed_split(
    accelerator: Any, model: TwoStreamRetrieval, split: RetrievalSplit, settings: EvalSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stream embeddings of every image [I, E] and caption [T, E], each computed once."""
    device, size = accelerator.device, settings.batch_size

    def image(chunk: torch.Tensor) -> torch.Tensor:
        return model.embed_images(**split.regions(chunk, device, settings.max_feat_num))

    def text(chunk: torch.Tensor) -> torch.Tensor:
        return model.embed_texts(**split.texts(chunk, device))

    dim, desc = model.embed_dim, f"eval {split.name}"
    return (
        _embed_all(accelerator, image, split.num_images, size, dim, f"{desc} images"),
        _embed_all(accelerator, text, split.num_captions, size, dim, f"{desc} captions"),
    )


def _embed_all(accelerator: Any, embed, total: int, size: int, dim: int, desc: str) -> torch.Tensor:
    rows = [torch.empty(0, dtype=torch.long)]
    values = [torch.empty(0, dim, device=accelerator.device)]
    for chunk in chunks_bar(accelerator, my_chunks(accelerator, total, size), desc):
        rows.append(chunk)
        values.append(embed(chunk).float())
    return all_rows(accelerator, torch.cat(rows), torch.cat(values), total)


def similarity_ranks(
    accelerator: Any,
    images: torch.Tensor,
    texts: torch.Tensor,
    split: RetrievalSplit,
    settings: EvalSettings,
    samples: TopCaptions | None = None,
) -> RetrievalRanks:
    """R@K state of the two-stream similarities, in blocks of image rows x all captions;
    `samples` keeps its sampled images' rows."""
    ranks = RetrievalRanks(split.caption_image, split.num_images, settings.ks)
    captions = torch.arange(split.num_captions)
    for chunk in my_chunks(accelerator, split.num_images, settings.similarity_chunk):
        scores = images[chunk.to(images.device)] @ texts.T
        ranks.add_block(chunk, captions, scores)
        if samples is not None:
            samples.add_block(chunk, captions, scores)
    return merge_ranks(accelerator, ranks, split, settings.ks)


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    regions: dict,
    texts: dict,
    image_of_pair: torch.Tensor,
    text_of_pair: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Single-stream scores of pairs (regions row `image_of_pair[p]`, text row `text_of_pair[p]`),
    at most `batch_size` pairs per forward."""
    scores = []
    for start in range(0, len(image_of_pair), max(1, batch_size)):
        rows = slice(start, start + max(1, batch_size))
        inputs = {k: v[image_of_pair[rows]] for k, v in regions.items()}
        inputs.update({k: v[text_of_pair[rows]] for k, v in texts.items()})
        scores.append(model(**clip_inputs(inputs)).float())
    return torch.cat(scores)


@torch.no_grad()
def full_ranks(
    accelerator: Any,
    model: torch.nn.Module,
    split: RetrievalSplit,
    settings: EvalSettings,
    samples: TopCaptions | None = None,
) -> tuple[RetrievalRanks, int]:
    """R@K state of single-stream scores of every (image, caption) pair; also the pair count.
    `samples` keeps its sampled images' rows."""
    device = accelerator.device
    ranks = RetrievalRanks(split.caption_image, split.num_images, settings.ks)
    per_block = max(1, settings.batch_size // settings.image_chunk)
    caption_chunks = torch.arange(split.num_captions).split(per_block)
    pairs = 0
    image_chunks = my_chunks(accelerator, split.num_images, settings.image_chunk)
    for chunk in chunks_bar(accelerator, image_chunks, f"eval {split.name} pairs", "image block"):
        regions = split.regions(chunk, device, settings.max_feat_num)
        for captions in caption_chunks:
            texts = split.texts(captions, device)
            img = torch.arange(len(chunk), device=device).repeat_interleave(len(captions))
            txt = torch.arange(len(captions), device=device).repeat(len(chunk))
            scores = score_pairs(model, regions, texts, img, txt, settings.batch_size)
            scores = scores.view(len(chunk), len(captions))
            ranks.add_block(chunk, captions, scores)
            if samples is not None:
                samples.add_block(chunk, captions, scores)
            pairs += len(img)
    return merge_ranks(accelerator, ranks, split, settings.ks), pairs


@torch.no_grad()
def rerank_ranks(
    accelerator: Any,
    model: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    split: RetrievalSplit,
    settings: EvalSettings,
    samples: TopCaptions | None = None,
) -> tuple[RetrievalRanks, int]:
    """R@K state when the single-stream model rescores each query's two-stream top-k only;
    `samples` keeps its sampled images' re-ranked rows.

    Candidates outside the top-k keep the score -inf, so a positive outside it is a miss.
    """
    device, k = accelerator.device, settings.rerank_k
    ranks = RetrievalRanks(split.caption_image, split.num_images, settings.ks)
    captions = torch.arange(split.num_captions)
    pairs = 0
    image_chunks = my_chunks(accelerator, split.num_images, settings.image_chunk)
    for chunk in chunks_bar(accelerator, image_chunks, f"eval {split.name} i2t", "image block"):
        top = (images[chunk.to(device)] @ texts.T).topk(min(k, split.num_captions), dim=1)[1]
        regions = split.regions(chunk, device, settings.max_feat_num)
        candidates = split.texts(top.flatten().cpu(), device)
        img = torch.arange(len(chunk), device=device).repeat_interleave(top.shape[1])
        pairs_of = torch.arange(top.numel(), device=device)
        scores = score_pairs(model, regions, candidates, img, pairs_of, settings.batch_size)
        full = torch.full((len(chunk), split.num_captions), float("-inf"), device=device)
        full.scatter_(1, top, scores.view(top.shape))
        ranks.add_i2t(chunk, full)
        if samples is not None:
            samples.add_block(chunk, captions, full)
        pairs += top.numel()
    caption_chunks = my_chunks(accelerator, split.num_captions, max(1, settings.batch_size // k))
    for chunk in chunks_bar(accelerator, caption_chunks, f"eval {split.name} t2i", "text block"):
        top = (texts[chunk.to(device)] @ images.T).topk(min(k, split.num_images), dim=1)[1]
        unique, inverse = top.flatten().unique(return_inverse=True)
        regions = split.regions(unique.tolist(), device, settings.max_feat_num)
        txt = torch.arange(len(chunk), device=device).repeat_interleave(top.shape[1])
        texts_of_chunk = split.texts(chunk, device)
        scores = score_pairs(model, regions, texts_of_chunk, inverse, txt, settings.batch_size)
        full = torch.full((len(chunk), split.num_images), float("-inf"), device=device)
        ranks.add_t2i(chunk, full.scatter_(1, top, scores.view(top.shape)))
        pairs += top.numel()
    return merge_ranks(accelerator, ranks, split, settings.ks), pairs


def _log_cost(accelerator: Any, what: str, split: RetrievalSplit, pairs: int, start: float) -> None:
    """Log the wall time and, for single-stream scoring, the pairs scored over all processes."""
    if accelerator.num_processes > 1:
        pairs = int(accelerator.reduce(torch.tensor(pairs, device=accelerator.device), "sum"))
    scored = f"{pairs} pairs scored" if pairs else "embeddings and similarities"
    logger.info(
        "%s on %s (%d images x %d captions): %s in %.1fs",
        what,
        split.name,
        split.num_images,
        split.num_captions,
        scored,
        time.perf_counter() - start,
    )


def evaluate_split(
    accelerator: Any,
    model: torch.nn.Module,
    split: RetrievalSplit,
    settings: EvalSettings,
    two_stream: TwoStreamRetrieval | None = None,
    *,
    step: int | None = None,
) -> dict[str, dict[str, float]]:
    """`{split: metrics}`; with `rerank_k`, also `{split}_two_stream` (the candidates' R@K).
    When W&B is logging, also the table `<split>/samples` of the first images' top captions."""
    samples = None
    if wandb_tracker(accelerator) is not None:
        samples = TopCaptions.for_split(split, accelerator.device)
    results = rank_split(accelerator, model, split, settings, two_stream, samples)
    log_samples(accelerator, split, samples, step)
    return results


def rank_split(
    accelerator: Any,
    model: torch.nn.Module,
    split: RetrievalSplit,
    settings: EvalSettings,
    two_stream: TwoStreamRetrieval | None,
    samples: TopCaptions | None,
) -> dict[str, dict[str, float]]:
    """The metrics of `evaluate_split`, by whichever scoring the models call for."""
    start = time.perf_counter()
    if isinstance(model, TwoStreamRetrieval):
        images, texts = embed_split(accelerator, model, split, settings)
        metrics = similarity_ranks(accelerator, images, texts, split, settings, samples).metrics()
        _log_cost(accelerator, "two-stream similarities", split, 0, start)
        return {split.name: metrics}
    if settings.rerank_k <= 0:
        ranks, pairs = full_ranks(accelerator, model, split, settings, samples)
        _log_cost(accelerator, "single-stream full scoring", split, pairs, start)
        return {split.name: ranks.metrics()}
    if two_stream is None:
        raise ValueError(
            "retrieval.rerank_k > 0 needs a two-stream model (retrieval.rerank_weights)"
        )
    images, texts = embed_split(accelerator, two_stream, split, settings)
    results = {
        f"{split.name}_two_stream": similarity_ranks(
            accelerator, images, texts, split, settings
        ).metrics()
    }
    ranks, pairs = rerank_ranks(accelerator, model, images, texts, split, settings, samples)
    _log_cost(accelerator, f"two-stream top-{settings.rerank_k} re-ranking", split, pairs, start)
    results[split.name] = ranks.metrics()
    return results


def evaluate_retrieval(
    accelerator: Any,
    model: torch.nn.Module,
    splits: Sequence[RetrievalSplit],
    settings: EvalSettings,
    two_stream: TwoStreamRetrieval | None = None,
    *,
    step: int | None = None,
) -> dict[str, dict[str, float]]:
    """R@K of every split (collective; call under `no_grad` with the models in eval mode);
    `step` is the training step W&B sample tables are logged at."""
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        results.update(evaluate_split(accelerator, model, split, settings, two_stream, step=step))
    return results
