"""Vision-language pretraining: masked pairs, TDEN's two-stage step, pretraining metrics.

Data. `PretrainPairs` gives one item per (image, caption) pair, already masked: BERT masking of
the WordPiece caption (15%; 80% [MASK], 10% random, 10% kept), masked regions (15%, features of
90% of them zeroed), a caption of another image as the ITM negative, and the generation
stream's caption in the captioning vocabulary with its input words masked too. Matching is
scored on the unmasked pair and negative (UNITER's choice; X-modaler's single-stream data masks
them too: on the synthetic task, ITM alone on masked inputs was still at chance after 650 steps,
where unmasked inputs had reached 67%).
Masks are drawn from (seed, epoch, pair index) alone, so they do not depend on workers, process
count or batch composition, and a resumed run replays them exactly. `collate_pretrain` pads.

Step. `pretrain_step(engine, batch, two_stage=...)` follows X-modaler's `TDENPretrainer`:
stage one computes the matching, masked-language, masked-region and generation losses; stage
two feeds the masked positions the model's own stage-one predictions (scheduled sampling in
pretraining) and computes the same losses without matching. `two_stage`:

- "separate" (X-modaler): two optimizer steps per batch. The step itself backpropagates stage
  one, clips as the engine is configured to (`engine.clip_grad`), steps and zeroes the optimizer,
  then returns stage two's loss, which the engine steps as usual. The LR scheduler steps once per
  batch (as X-modaler's does per iteration). Gradient accumulation is not supported with it.
- "summed": one optimizer step on the sum of both stages' losses (both stages in one forward).
- "off": stage one only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.collate import (
    IGNORE_INDEX,
    collate_pairs,
    mask_regions,
    mask_tokens,
    pad_ids,
    pad_regions,
)
from ..data.datasets import PairDataset
from ..evaluation import gather_predictions
from ..models.pretrain import second_stage_batch
from ..objectives import (
    caption_loss,
    itm_accuracy,
    itm_loss,
    masked_accuracy,
    masked_lm_loss,
    region_accuracy,
    region_feature_loss,
    region_kl_loss,
)

TWO_STAGE_MODES = ("separate", "summed", "off")
LOSS_NAMES = ("mlm", "mrm_class", "mrm_feature", "itm", "caption")


# --------------------------------------------------------------------------- data
def caption_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int, int]:
    """(BOS, EOS, PAD, MASK) of a captioning tokenizer; WordPiece's [CLS]/[SEP] serve as BOS/EOS
    and UNK as the mask of a word-level vocabulary, which has no [MASK]."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    mask = tokenizer.mask_token_id
    mask = tokenizer.unk_token_id if mask is None else mask
    if None in (bos, eos, tokenizer.pad_token_id, mask):
        raise ValueError("the caption tokenizer needs BOS/EOS (or CLS/SEP), PAD and UNK tokens")
    return bos, eos, tokenizer.pad_token_id, mask


class PretrainPairs(PairDataset):
    """Masked (image, caption) pairs with an ITM negative caption (see the module docstring)."""

    def __init__(
        self,
        table: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        caption_tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 40,
        max_seq_len: int = 20,
        mask_prob: float = 0.15,
        region_mask_prob: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(table, tokenizer, max_length=max_length)
        if tokenizer.mask_token_id is None:
            raise ValueError("data.tokenizer must be a BERT WordPiece tokenizer with [MASK]")
        if len(self.starts) < 3:
            raise ValueError("pretraining needs at least two images (ITM negatives)")
        self.caption_tokenizer = caption_tokenizer
        self.caption_ids = caption_specials(caption_tokenizer)
        self.max_seq_len = max_seq_len
        self.mask_prob, self.region_mask_prob = mask_prob, region_mask_prob
        self.seed, self.epoch = seed, 0
        specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        self.special = torch.tensor([i for i in specials if i is not None])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        """The random stream of one pair in the current epoch."""
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def mask_text(self, ids: np.ndarray, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT masking of WordPiece ids: (masked ids, labels with IGNORE_INDEX elsewhere)."""
        ids_t = torch.from_numpy(ids)
        masked, labels = mask_tokens(
            ids_t,
            torch.isin(ids_t, self.special),
            mask_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            prob=self.mask_prob,
            generator=gen,
        )
        return masked.numpy(), labels.numpy()

    def negative_pair(self, row: int, gen: torch.Generator) -> int:
        """A pair index drawn uniformly from the pairs of every other image."""
        own = int(self.starts[row + 1] - self.starts[row])
        draw = int(torch.randint(len(self) - own, (1,), generator=gen))
        return draw + own if draw >= self.starts[row] else draw

    def caption_item(self, caption: str, gen: torch.Generator) -> dict[str, np.ndarray]:
        """Generation-stream input (BOS w1..wn, words masked), targets and the masked flags."""
        bos, _, pad, mask_id = self.caption_ids
        encoded = self.caption_tokenizer(caption, truncation=True, max_length=self.max_seq_len + 2)[
            "input_ids"
        ]
        ids = torch.tensor(encoded, dtype=torch.long)
        inputs = ids[:-1]
        keep = (inputs == bos) | (inputs == pad)
        keep[0] = True
        masked, labels = mask_tokens(
            inputs,
            keep,
            mask_id=mask_id,
            vocab_size=len(self.caption_tokenizer),
            prob=self.mask_prob,
            generator=gen,
        )
        return {
            "caption_input": masked.numpy(),
            "caption_target": ids[1:].numpy(),
            "caption_masked": (labels != IGNORE_INDEX).numpy(),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        gen = self.generator(index)
        negative = super().__getitem__(self.negative_pair(self.locate(index)[0], gen))
        item["negative_ids"] = negative["input_ids"]
        item["input_ids"], item["mlm_labels"] = self.mask_text(item["input_ids"], gen)
        features = torch.tensor(np.asarray(item["features"], dtype=np.float32))
        masked, picked = mask_regions(
            features,
            torch.ones(len(features), dtype=torch.bool),
            prob=self.region_mask_prob,
            generator=gen,
        )
        item.update(
            target_features=features.numpy(), features=masked.numpy(), region_picked=picked.numpy()
        )
        item.update(self.caption_item(item["caption"], gen))
        return item


def _pad_flags(rows: Sequence[np.ndarray], limit: int | None = None) -> torch.Tensor:
    return pad_ids([np.asarray(r[:limit], dtype=np.int64) for r in rows])[0].bool()


def collate_pretrain(
    items: Sequence[dict[str, Any]],
    *,
    max_feat_num: int = 50,
    pad_id: int = 0,
    caption_pad_id: int = 0,
) -> dict[str, Any]:
    """Pad `PretrainPairs` items: `collate_pairs`'s batch plus labels, targets and negatives.

    Captions, their unmasked `clean_ids` and the negatives are padded to one length, so that
    they can share a forward pass; `target_features` are the unmasked regions.
    """
    batch = collate_pairs(items, max_feat_num=max_feat_num, pad_id=pad_id)
    count = len(items)
    texts = [it["input_ids"] for it in items] + [it["negative_ids"] for it in items]
    ids, mask = pad_ids(texts, pad_id=pad_id)
    labels, _ = pad_ids([it["mlm_labels"] for it in items], pad_id=IGNORE_INDEX)
    labels = F.pad(labels, (0, ids.shape[1] - labels.shape[1]), value=IGNORE_INDEX)
    clean = torch.where(labels != IGNORE_INDEX, labels, ids[:count])
    limit = max_feat_num if max_feat_num > 0 else None
    targets, _, _ = pad_regions(
        [it["target_features"] for it in items],
        [it["boxes"] for it in items],
        max_feat_num=max_feat_num,
    )
    caption_input, _ = pad_ids([it["caption_input"] for it in items], pad_id=caption_pad_id)
    batch.update(
        input_ids=ids[:count],
        attention_mask=mask[:count],
        clean_ids=clean,
        negative_ids=ids[count:],
        negative_mask=mask[count:],
        mlm_labels=labels,
        target_features=targets,
        region_picked=_pad_flags([it["region_picked"] for it in items], limit),
        caption_input=caption_input,
        caption_target=pad_ids([it["caption_target"] for it in items], pad_id=IGNORE_INDEX)[0],
        caption_masked=_pad_flags([it["caption_masked"] for it in items]),
    )
    return batch


# --------------------------------------------------------------------------- the step
def stage_losses(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    itm: bool,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum of the objectives, {loss_<name>, <name>_acc}) for one stage's outputs."""
    picked = batch["region_picked"]
    terms = {
        "mlm": masked_lm_loss(out["mlm_logits"], batch["mlm_labels"]),
        "mrm_feature": region_feature_loss(
            out["region_features"], batch["target_features"], picked
        ),
        "caption": caption_loss(
            out["caption_logits"], batch["caption_target"], smoothing=smoothing
        ),
    }
    metrics = {
        "mlm_acc": masked_accuracy(out["mlm_logits"], batch["mlm_labels"]),
        "caption_acc": masked_accuracy(out["caption_logits"], batch["caption_target"]),
    }
    if "region_logits" in out:
        terms["mrm_class"] = region_kl_loss(out["region_logits"], batch["cls_prob"], picked)
        metrics["mrm_acc"] = region_accuracy(out["region_logits"], batch["cls_prob"], picked)
    logits = out["itm_logits"]
    if itm:
        labels = itm_labels(logits, len(batch["input_ids"]))
        terms["itm"] = itm_loss(logits, labels)
        metrics["itm_acc"] = itm_accuracy(logits, labels)
    total = sum(weights[name] * value for name, value in terms.items())
    if not itm:
        total = total + 0.0 * logits.sum()  # keeps the matching head in the graph (DDP)
    metrics.update({f"loss_{name}": value.detach() for name, value in terms.items()})
    return total, {name: value.detach() for name, value in metrics.items()}


def itm_labels(logits: torch.Tensor, pairs: int) -> torch.Tensor:
    """1 for the first `pairs` logits (matching pairs), 0 for the negatives after them."""
    return (torch.arange(len(logits), device=logits.device) < pairs).float()


def _second(metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}_s2": value for name, value in metrics.items()}


def pretrain_step(
    engine: Any,
    batch: Mapping[str, Any],
    *,
    two_stage: str = "separate",
    weights: Mapping[str, float] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """TDEN's step (module docstring); `loss` is what the engine backpropagates and steps."""
    if two_stage not in TWO_STAGE_MODES:
        raise ValueError(f"pretrain.two_stage: {two_stage!r} is not one of {TWO_STAGE_MODES}")
    unknown = set(weights or {}) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"pretrain.loss_weights: unknown {sorted(unknown)}; expected {LOSS_NAMES}")
    weights = {**dict.fromkeys(LOSS_NAMES, 1.0), **(weights or {})}
    losses = {"weights": weights, "smoothing": label_smoothing}
    if two_stage == "summed":
        first, second = engine.model(batch, two_pass=True)
        loss1, metrics1 = stage_losses(first, batch, itm=True, **losses)
        loss2, metrics2 = stage_losses(second, batch, itm=False, **losses)
        out = {"loss": loss1 + loss2, "loss_s1": loss1.detach(), "loss_s2": loss2.detach()}
        return {**out, **metrics1, **_second(metrics2)}
    (first,) = engine.model(batch)
    loss1, metrics1 = stage_losses(first, batch, itm=True, **losses)
    if two_stage == "off":
        return {"loss": loss1, **metrics1}
    if engine.accelerator.gradient_accumulation_steps > 1:
        raise ValueError(
            "pretrain.two_stage=separate steps the optimizer after each stage and cannot "
            "accumulate gradients (train.grad_accum > 1); use pretrain.two_stage=summed"
        )
    norm = engine.inner_update(loss1)
    batch2 = second_stage_batch(batch, first)
    del first  # only its predictions are needed: free the vocabulary-sized logits
    (second,) = engine.model(batch2, itm=False)
    loss2, metrics2 = stage_losses(second, batch, itm=False, **losses)
    out = {"loss": loss2, "loss_s1": loss1.detach(), "loss_s2": loss2.detach()}
    if norm is not None:
        out["grad_norm_s1"] = norm
    return {**out, **metrics1, **_second(metrics2)}


# --------------------------------------------------------------------------- evaluation
def pair_counts(out: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
    """Per pair [B, 2 * k]: (right, total) for MLM, caption words, masked regions and ITM."""
    rows = len(batch["input_ids"])

    def tokens(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        valid = labels != IGNORE_INDEX
        return [((logits.argmax(-1) == labels) & valid).sum(1), valid.sum(1)]

    counts = tokens(out["mlm_logits"], batch["mlm_labels"])
    counts += tokens(out["caption_logits"], batch["caption_target"])
    if "region_logits" in out:
        picked = batch["region_picked"]
        agree = out["region_logits"].argmax(-1) == batch["cls_prob"].argmax(-1)
        counts += [(agree & picked).sum(1), picked.sum(1)]
    logits = out["itm_logits"]
    if len(logits) > rows:
        right = (logits[:rows] > 0).long() + (logits[rows:] <= 0).long()
        counts += [right, torch.full_like(right, 2)]
    return torch.stack(counts, dim=1)


def count_names(out: Mapping[str, torch.Tensor], rows: int, suffix: str = "") -> list[str]:
    """The metric names of `pair_counts`' columns, in order."""
    names = ["mlm_acc", "caption_acc"]
    names += ["mrm_acc"] if "region_logits" in out else []
    names += ["itm_acc"] if len(out["itm_logits"]) > rows else []
    return [name + suffix for name in names]


@torch.no_grad()
def pretrain_metrics(
    accelerator: Any, model: torch.nn.Module, loader: Any, num_pairs: int, *, two_pass: bool
) -> dict[str, float]:
    """Accuracies over an evaluation loader of `collate_pretrain` batches (collective).

    Counts are gathered per pair (`gather_predictions` drops padded duplicates and checks that
    every pair was seen once) and pooled: accuracy = right / total over the split.
    """
    ids: list[int] = []
    rows: list[list[int]] = []
    names: list[str] = []
    for batch in loader:
        outs = model(batch, two_pass=two_pass)
        counts = [pair_counts(outs[0], batch)]
        names = count_names(outs[0], len(batch["input_ids"]))
        if two_pass:
            counts.append(pair_counts(outs[1], batch))
            names += count_names(outs[1], len(batch["input_ids"]), "_s2")
        ids += batch["index"].tolist()
        rows += torch.cat(counts, dim=1).tolist()
    merged = gather_predictions(accelerator, ids, [tuple(r) for r in rows], num_pairs)
    totals = np.asarray(list(merged.values()), dtype=np.int64).sum(axis=0)
    return {name: float(totals[2 * i] / max(totals[2 * i + 1], 1)) for i, name in enumerate(names)}
