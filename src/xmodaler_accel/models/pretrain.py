"""A TDEN-style pretraining model: an understanding stream and a generation stream over the same
masked regions, with the heads of every pretraining objective (X-modaler's `TDENPretrain`).

- Understanding stream: the single-stream BERT joint encoder of retrieval and VCR
  (`SingleStreamEncoder`, `transformers.BertModel` random or from a local `bert_dir`) with
  BERT's masked-LM head (decoder tied to the word embeddings), a masked-region head (detector
  class logits and regressed features) and the matching head `head` (`ITMHead`, one logit,
  scored on the unmasked pairs and on sampled negatives).
- Generation stream: the Transformer captioner of the captioning recipes (`captioner`), trained
  on the caption with some of its input words masked, as TDEN's generation stream is.

X-modaler's TDEN shares one visual encoder between its two decoupled streams. Here each stream
keeps the layout of the model it fine-tunes into, so that its weights carry over unchanged:
`encoder.*` + `head.*` are exactly `SingleStreamRetrieval`'s keys (and `VCRModel`'s, up to
the token-type table), `captioner.*` without the prefix is exactly `TransformerCaptioner`'s.
`export_finetune_weights` writes those subsets as files that `model.weights=` loads strictly.

`forward(batch, two_pass=True)` runs TDEN's two stages in one call: the second pass sees the
first pass's arg-max predictions in exactly the masked positions (`second_stage_batch`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from ..masking import IGNORE_INDEX
from .single_stream import ITMHead, SingleStreamEncoder, bert_from_config
from .transformer import TransformerCaptioner
from .vcr import VISUAL_TYPE_ID as VCR_VISUAL_TYPE_ID  # text 0, choice 1, regions 2

if TYPE_CHECKING:
    from transformers import BertConfig

EXPORT_TARGETS = ("retrieval", "vcr", "encoder", "captioner")


def _bert_head_transform(config: BertConfig) -> nn.Module:
    # Imported here: loading BERT's modeling code takes seconds, which recipes that do not
    # pretrain (and `--print-config`) need not wait for.
    from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

    return BertPredictionHeadTransform(config)


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense, GELU, LayerNorm, then word logits (decoder tied when given)."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        self.transform = _bert_head_transform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if word_embeddings is not None:
            self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class RegionHead(nn.Module):
    """Masked-region head: a BERT transform, then detector-class logits and region features."""

    def __init__(self, config: BertConfig, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.transform = _bert_head_transform(config)
        self.classifier = nn.Linear(config.hidden_size, num_classes) if num_classes > 0 else None
        self.regressor = nn.Linear(config.hidden_size, feat_dim)

    def forward(self, hidden: Tensor) -> tuple[Tensor | None, Tensor]:
        """(class logits [B, N, C] or None without classes, features [B, N, feat_dim])."""
        x = self.transform(hidden)
        logits = self.classifier(x) if self.classifier is not None else None
        return logits, self.regressor(x)


def second_stage_batch(batch: Mapping[str, Any], first: Mapping[str, Tensor]) -> dict[str, Any]:
    """The batch of TDEN's second stage: masked inputs replaced by the first stage's predictions.

    Understanding stream: each masked token (`mlm_labels` set) becomes the MLM arg-max there.
    Generation stream: each masked caption input t becomes the word the stream predicted at
    t - 1, i.e. its own guess of word t (X-modaler's `TDENPretrainer.run_step`). Everything else,
    targets included, is unchanged.
    """
    with torch.no_grad():
        words = first["mlm_logits"].argmax(-1)
        input_ids = torch.where(batch["mlm_labels"] != IGNORE_INDEX, words, batch["input_ids"])
        caption_input = batch["caption_input"]
        guesses = first["caption_logits"].argmax(-1)
        previous = torch.cat([caption_input[:, :1], guesses[:, :-1]], dim=1)
        caption_input = torch.where(batch["caption_masked"], previous, caption_input)
    return {**batch, "input_ids": input_ids, "caption_input": caption_input}


class TDENPretrainModel(nn.Module):
    """Both streams and every pretraining head; `forward` returns one output dict per stage."""

    def __init__(
        self,
        encoder: SingleStreamEncoder,
        captioner: TransformerCaptioner,
        *,
        feat_dim: int,
        num_region_classes: int,
        itm_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.head = ITMHead(config.hidden_size, 1, itm_dropout)
        self.mlm = MaskedLMHead(config, encoder.bert.embeddings.word_embeddings)
        self.mrm = RegionHead(config, feat_dim, num_region_classes)
        self.captioner = captioner

    def forward(
        self, batch: Mapping[str, Any], *, itm: bool = True, two_pass: bool = False
    ) -> tuple[dict[str, Tensor], ...]:
        """Stage one (with ITM negatives when `itm`), and stage two too when `two_pass`."""
        first = self.run_pass(batch, itm=itm)
        if not two_pass:
            return (first,)
        return first, self.run_pass(second_stage_batch(batch, first), itm=False)

    def run_pass(self, batch: Mapping[str, Any], *, itm: bool) -> dict[str, Tensor]:
        """Logits of every head for the batch's masked pairs; matching scores on clean inputs.

        With `itm`, BERT also runs over the unmasked pairs (`clean_ids`, `target_features`) and
        the negatives (each image with another image's caption, `negative_ids`), and
        `itm_logits` [2B] holds the clean pairs' scores, then the negatives'. Without it,
        `itm_logits` [B] scores the masked pairs (no loss uses them; they keep the head in the
        graph for DDP).
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = ids.shape[0]
        regions = (batch["features"], batch["boxes"], batch["region_mask"])
        if itm:
            clean = (batch["target_features"], *regions[1:])
            ids = torch.cat([ids, batch["clean_ids"], batch["negative_ids"]])
            mask = torch.cat([mask, mask, batch["negative_mask"]])
            joint = self.encoder(ids, mask, *(torch.cat([a, b, b]) for a, b in zip(regions, clean)))
            pooled = joint.pooled[rows:]
        else:
            joint = self.encoder(ids, mask, *regions)
            pooled = joint.pooled
        class_logits, region_features = self.mrm(joint.regions[:rows])
        out = {
            "mlm_logits": self.mlm(joint.text[:rows]),
            "region_features": region_features,
            "itm_logits": self.head(pooled),
            "caption_logits": self.captioner(*regions, batch["caption_input"]),
        }
        if class_logits is not None:
            out["region_logits"] = class_logits
        return out


def build_pretrain_model(
    cfg: Any,
    *,
    feat_dim: int,
    vocab_size: int,
    pad_id: int,
    caption_vocab_size: int,
    caption_ids: tuple[int, int, int],
    num_region_classes: int,
    max_len: int = 20,
) -> TDENPretrainModel:
    """The model from `model.single_stream` and `model.transformer` (the fine-tuning recipes'
    sections, so that sizes copy over); `caption_ids` are the captioner's (BOS, EOS, PAD)."""
    sizes = cfg.single_stream
    bert = bert_from_config(sizes, vocab_size=vocab_size, pad_id=pad_id)
    encoder = SingleStreamEncoder(bert, feat_dim, pooling=sizes.pooling)
    bos, eos, pad = caption_ids
    captioner = TransformerCaptioner(
        caption_vocab_size,
        feat_dim,
        max_len=max_len,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        **cfg.transformer,
    )
    return TDENPretrainModel(
        encoder,
        captioner,
        feat_dim=feat_dim,
        num_region_classes=num_region_classes,
        itm_dropout=sizes.dropout,
    )


def vcr_token_types(weight: Tensor, visual_type_id: int) -> Tensor:
    """The token-type table in VCR's layout: every type starts as text type 0 (UNITER's
    initialisation of new types), the region type takes the pretrained region type's row."""
    table = weight[0].expand(VCR_VISUAL_TYPE_ID + 1, -1).clone()
    table[VCR_VISUAL_TYPE_ID] = weight[visual_type_id]
    return table


def finetune_module(model: TDENPretrainModel, target: str) -> nn.Module:
    """The part of `model` one fine-tuning model takes, with that model's key names.

    `retrieval`: `encoder.*` and `head.*` (`SingleStreamRetrieval`); `vcr`: the same with the
    token-type table in VCR's three-type layout (`VCRModel`); `encoder`: a bare
    `SingleStreamEncoder`; `captioner`: a `TransformerCaptioner` with the same sizes.
    """
    if target in ("retrieval", "vcr"):
        encoder = model.encoder
        if target == "vcr":
            encoder = copy.deepcopy(encoder)
            types = encoder.bert.embeddings.token_type_embeddings.weight.detach()
            table = vcr_token_types(types, encoder.visual_type_id)
            encoder.bert.embeddings.token_type_embeddings = nn.Embedding.from_pretrained(
                table, freeze=False
            )
        return nn.ModuleDict({"encoder": encoder, "head": model.head})
    if target == "encoder":
        return model.encoder
    if target == "captioner":
        return model.captioner
    raise ValueError(f"unknown export target {target!r}; expected one of {EXPORT_TARGETS}")


def finetune_state_dict(model: TDENPretrainModel, target: str) -> dict[str, Tensor]:
    """`finetune_module(model, target)`'s weights, tied ones under each of their names."""
    return finetune_module(model, target).state_dict()


def export_finetune_weights(
    model: TDENPretrainModel,
    directory: str | os.PathLike,
    targets: tuple[str, ...] = EXPORT_TARGETS,
) -> dict[str, Path]:
    """Write `<directory>/<target>.safetensors` for each target (atomically); returns the paths.

    Saved with `safetensors.torch.save_model`, which stores tied weights once, as
    `load_weights` expects.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for target in targets:
        path = directory / f"{target}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_model(finetune_module(model, target), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        paths[target] = path
    return paths
