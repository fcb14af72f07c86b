"""Retrieval training steps: two-stream contrastive (`retrieval_step`, X-modaler's
`RetrievalTrainer`) and single-stream image-text matching with random or model-mined hard
negatives (`itm_step`, `itm_hard_negative_step`: `SingleStreamRetrievalTrainer[HardNegatives]`).

Batches come from `collate_pairs` (one row per image-caption pair, `image_index` naming the
image). Two rows with the same image are positives of each other, never negatives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGION_KEYS = ("features", "boxes", "region_mask", "region_labels", "cls_prob")
PAIR_KEYS = ("input_ids", "attention_mask", "features", "boxes", "region_mask", "token_type_ids")


# --------------------------------------------------------------------------- two-stream
def gather_with_grad(accelerator: Any, x: torch.Tensor) -> torch.Tensor:
    """The global batch [W * B, ...]: other processes' rows as data, this process's with gradient.

    Every process then computes the same global loss, so the gradient of its own rows is the same
    on every process; scaling that gradient by W makes DDP's average over W processes equal the
    single-process gradient of the global batch (what LAVIS's all-reduce in backward gives).
    """
    world = accelerator.num_processes
    if world == 1:
        return x
    everything = accelerator.gather(x.detach().contiguous())
    rank, size = accelerator.process_index, x.shape[0]
    local = x + (world - 1) * (x - x.detach())  # the value of x, W times its gradient
    return torch.cat([everything[: rank * size], local, everything[(rank + 1) * size :]])


def max_violation_loss(
    sims: torch.Tensor, positive: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """VSE++: per pair, the hinge of the hardest in-batch negative caption and image; mean.

    `sims` [B, B] holds image i (row) against caption j (column), pairs on the diagonal;
    `positive` [B, B] marks same-image entries, which are excluded from the negatives.
    """
    matching = sims.diagonal()
    negatives = sims.masked_fill(positive, float("-inf"))
    hardest_caption = (margin + negatives - matching[:, None]).clamp(min=0).amax(dim=1)
    hardest_image = (margin + negatives - matching[None, :]).clamp(min=0).amax(dim=0)
    return (hardest_caption + hardest_image).mean()


def infonce_loss(
    sims: torch.Tensor, positive: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over the batch; other captions of the same image are masked."""
    logits = sims * logit_scale
    eye = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    logits = logits.masked_fill(positive & ~eye, float("-inf"))
    targets = torch.arange(len(sims), device=sims.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def retrieval_step(
    engine: Any, batch: dict[str, Any], *, loss: str = "max_violation", margin: float = 0.2
) -> dict[str, torch.Tensor]:
    """Two-stream step: embed the pairs, take negatives from the global batch, apply `loss`."""
    out = engine.model(
        batch["features"],
        batch["boxes"],
        batch["region_mask"],
        batch["input_ids"],
        batch["attention_mask"],
    )
    accelerator = engine.accelerator
    images = gather_with_grad(accelerator, out["image"])
    texts = gather_with_grad(accelerator, out["text"])
    ids = batch["image_index"]
    ids = accelerator.gather(ids) if accelerator.num_processes > 1 else ids
    sims = images @ texts.T
    positive = ids[:, None] == ids[None, :]
    if loss == "infonce":
        value = infonce_loss(sims, positive, out["logit_scale"])
    elif loss == "max_violation":
        value = max_violation_loss(sims, positive, margin)
    else:
        raise ValueError(f"model.two_stream.loss: {loss!r} is not max_violation or infonce")
    result = {"loss": value, "pos_sim": sims.diagonal().mean().detach()}
    if "logit_scale" in out:
        result["logit_scale"] = out["logit_scale"].detach()
    return result


# --------------------------------------------------------------------------- single-stream
def clip_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Trim text to the longest real sequence and regions to the most real regions (X-modaler's
    `clip_t_inputs`/`clip_v_inputs`); masks are right-padded. Scores do not change.

    `collate_pairs` already pads to the batch maximum; this matters for batches padded to a fixed
    length and for rows selected out of a batch (negatives, evaluation chunks).
    """
    out = dict(batch)
    for mask_key, keys in (("attention_mask", TEXT_KEYS), ("region_mask", REGION_KEYS)):
        if mask_key not in batch:
            continue
        length = int(batch[mask_key].sum(dim=1).max())
        for key in keys:
            if key in out and torch.is_tensor(out[key]):
                out[key] = out[key][:, :length]
    return out


def pair_inputs(
    batch: dict[str, Any], images: torch.Tensor, captions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Model inputs for the pairs (image row `images[p]`, caption row `captions[p]`), clipped."""
    pairs = {key: batch[key][images] for key in REGION_KEYS[:3]}
    pairs.update({key: batch[key][captions] for key in TEXT_KEYS if key in batch})
    return clip_inputs(pairs)


@torch.no_grad()
def cross_scores(
    model: torch.nn.Module,
    batch: dict[str, Any],
    images: torch.Tensor,
    captions: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """Scores [len(images), len(captions)] of every image row against every caption row."""
    rows = images.repeat_interleave(len(captions))
    cols = captions.repeat(len(images))
    scores = [
        model(**pair_inputs(batch, rows[s : s + chunk], cols[s : s + chunk])).float()
        for s in range(0, len(rows), chunk)
    ]
    return torch.cat(scores).view(len(images), len(captions))


def select_negatives(
    scores: torch.Tensor, positive: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor row, the `count` highest-scoring candidates that are not positives.

    Returns (candidate columns [A, count], valid [A, count]); a row with fewer non-positive
    candidates than `count` has invalid entries, which the loss ignores.
    """
    masked = scores.float().masked_fill(positive, float("-inf"))
    take = min(count, scores.shape[1])
    index = masked.topk(take, dim=1).indices
    valid = ~positive.gather(1, index)
    if take < count:
        pad = count - take
        index = F.pad(index, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    return index, valid


def negative_pool(size: int, pool: int, device: torch.device) -> torch.Tensor:
    """Batch rows to draw negatives from: all of them, or a random `pool` of them."""
    if 0 < pool < size:
        return torch.randperm(size, device=device)[:pool]
    return torch.arange(size, device=device)


def mine_negatives(
    model: torch.nn.Module,
    batch: dict[str, Any],
    pool: torch.Tensor,
    *,
    count: int,
    side: str,
    hard: bool,
    chunk: int = 256,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(image rows, caption rows, valid), each [B, count], per negative side ("text", "image").

    Hard: the candidates the current model scores highest (in eval mode, without gradients), as
    X-modaler's `hard_negative_mining`; otherwise a uniformly random choice among non-positives.
    """
    ids = batch["image_index"]
    size, device = len(ids), ids.device
    anchors = torch.arange(size, device=device)
    positive = ids[:, None] == ids[pool][None, :]  # anchor row vs candidate row: same image
    text_scores = image_scores = None
    if hard:
        was_training = model.training
        model.eval()
        if side in ("text", "both"):
            text_scores = cross_scores(model, batch, anchors, pool, chunk)
        if side in ("image", "both"):
            same = text_scores is not None and len(pool) == size and torch.equal(pool, anchors)
            image_scores = (
                text_scores.T if same else cross_scores(model, batch, pool, anchors, chunk).T
            )
        model.train(was_training)
    groups = []
    for name, scores in (("text", text_scores), ("image", image_scores)):
        if side not in (name, "both"):
            continue
        if scores is None:
            scores = torch.rand(positive.shape, device=device)
        index, valid = select_negatives(scores, positive, count)
        chosen, own = pool[index], anchors[:, None].expand_as(index)
        groups.append((own, chosen, valid) if name == "text" else (chosen, own, valid))
    return groups


def itm_step(
    engine: Any,
    batch: dict[str, Any],
    *,
    negatives: int = 3,
    pool: int = 0,
    hard: bool = False,
    side: str = "both",
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Single-stream step: each pair against `negatives` captions of other images and/or
    `negatives` other images (`side`), drawn from `pool` batch rows (0: all); softmax over them.
    """
    if side not in ("text", "image", "both"):
        raise ValueError(f"train.negative_side: {side!r} is not text, image or both")
    batch = clip_inputs(batch)
    size, device = len(batch["image_index"]), batch["image_index"].device
    candidates = negative_pool(size, pool, device)
    with engine.gathered_model() as model:  # scoring outside the wrapper's forward
        groups = mine_negatives(
            model, batch, candidates, count=negatives, side=side, hard=hard, chunk=chunk
        )
    anchors = torch.arange(size, device=device)[:, None]
    ones = torch.ones_like(anchors, dtype=torch.bool)
    image_rows = torch.cat([anchors, *(g[0] for g in groups)], dim=1)
    caption_rows = torch.cat([anchors, *(g[1] for g in groups)], dim=1)
    valid = torch.cat([ones, *(g[2] for g in groups)], dim=1)
    inputs = pair_inputs(batch, image_rows.flatten(), caption_rows.flatten())
    logits = engine.model(**inputs).float().view(valid.shape).masked_fill(~valid, float("-inf"))
    targets = torch.zeros(size, dtype=torch.long, device=device)
    return {
        "loss": F.cross_entropy(logits, targets),
        "itm_acc": (logits[:, :1] > logits[:, 1:]).all(dim=1).float().mean(),
    }


def itm_hard_negative_step(engine: Any, batch: dict[str, Any], **kwargs: Any) -> dict:
    """`itm_step` with negatives mined by the current model (X-modaler's HardNegatives trainer)."""
    return itm_step(engine, batch, hard=True, **kwargs)
