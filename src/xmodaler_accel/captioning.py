"""Captioning pieces the XE and SCST recipes share: config defaults, data, evaluation.

The evaluator decodes a split with beam search, gathers one caption per image from all
processes (duplicates from padded samplers dropped, coverage checked), scores them with the
coco-caption metrics on the main process and writes `eval/<split>_step<N>_captions.json`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import DEFAULTS, Config
from .data import ImageDataset, build_synthetic, collate_images, load_tokenizer, synthetic_dir
from .evaluation import gather_predictions, write_json_atomic
from .metrics import score_captions

logger = logging.getLogger(__name__)


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Where every recipe's data comes from (`dataset_dir`): "synthetic" builds the embedded scenes with
# these parameters; anything else is a directory from `python -m xmodaler_accel.data.convert`.
DATASET_DEFAULTS: dict[str, Any] = {
    "source": "synthetic",
    "cache_dir": "",
    "synthetic": {"seed": 0, "feat_dim": 256, "num_train": 4000, "num_val": 500, "num_test": 500},
}

CAPTION_DEFAULTS: dict[str, Any] = _merged(
    DEFAULTS,
    {
        "train": {
            # X-modaler: SCHEDULED_SAMPLING.START_EPOCH / INC_EVERY_EPOCH / INC_PROB / MAX_PROB
            "scheduled_sampling": {"start_epoch": 0, "every": 5, "prob": 0.05, "max_prob": 0.25},
            "ema_decay": 0.0,  # > 0 evaluates with EMA weights
        },
        "eval": {"splits": ["val", "test"], "metrics": ["bleu", "meteor", "rouge", "cider"]},
        "decode": {"beam_size": 3, "max_len": 20, "length_norm": False},
        # Self-critical training (recipes/scst.py) replaces these XE settings.
        "scst": {
            "output_dir": "output/scst",
            "max_steps": 1000,
            "batch_size": 10,  # images per process (X-modaler: 10 images x 5 samples)
            "lr": 2e-5,
            "eval_every": 500,
            "sampler": "sample",  # sample | beam
            "baseline": "greedy",  # greedy | mean | leave_one_out
            "samples_per_image": 5,
            "temperature": 1.0,
            "cider_weight": 1.0,
            "bleu_weight": 0.0,
        },
        "data": {
            **DATASET_DEFAULTS,
            "max_feat_num": 50,
            "use_global_v": False,
            "seq_per_img": 5,
            "max_seq_len": 20,
        },
    },
)


def dataset_dir(cfg: Config) -> Path:
    """The dataset directory (built for the synthetic task on first use, then cached)."""
    if cfg.data.source == "synthetic":
        return synthetic_dir(cfg.data.cache_dir or None, **cfg.data.synthetic)
    path = Path(cfg.data.source)
    if not path.is_dir():
        raise FileNotFoundError(f"config key 'data.source': no dataset directory at {path}")
    return path


def open_dataset(cfg: Config):
    """(DatasetDict memory-mapped, tokenizer) for `data.source`."""
    from datasets import load_from_disk

    root = dataset_dir(cfg)
    if cfg.data.source == "synthetic":
        data = build_synthetic(cfg.data.cache_dir or None, **cfg.data.synthetic)
    else:
        data = load_from_disk(str(root))
    return data, load_tokenizer(root)


def image_collate(cfg: Config) -> Callable:
    return partial(
        collate_images, max_feat_num=cfg.data.max_feat_num, use_global_v=cfg.data.use_global_v
    )


class CaptionEvaluator:
    """`evaluator(engine) -> {split: metrics}`: beam-search a split and score it (collective)."""

    def __init__(
        self,
        accelerator: Any,
        table: Any,
        tokenizer: Any,
        split: str,
        *,
        decode: Callable[[torch.nn.Module, dict], torch.Tensor],
        collate_fn: Callable,
        batch_size: int,
        metrics: Sequence[str],
    ) -> None:
        self.accelerator, self.tokenizer, self.split = accelerator, tokenizer, split
        self.decode, self.metrics = decode, tuple(metrics)
        loader = DataLoader(
            ImageDataset(table), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
        )
        self.loader = accelerator.prepare_data_loader(loader)
        self.references = dict(zip(table["image_id"], table["captions"]))

    def predict(self, model: torch.nn.Module) -> dict[int, str]:
        ids: list[int] = []
        captions: list[str] = []
        progress = tqdm(
            self.loader,
            desc=f"eval {self.split}",
            leave=False,
            disable=not self.accelerator.is_local_main_process,
        )
        for batch in progress:
            tokens = self.decode(model, batch)
            captions += self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
            ids += batch["image_ids"].tolist()
        return gather_predictions(self.accelerator, ids, captions, list(self.references))

    def __call__(self, engine: Any) -> dict[str, dict[str, float]]:
        predictions = self.predict(engine.unwrapped_model)
        result: list[Any] = [None]
        if self.accelerator.is_main_process:
            refs = {i: self.references[i] for i in predictions}
            result[0] = score_captions(predictions, refs, metrics=self.metrics)
            path = (
                Path(engine.output_dir) / "eval" / f"{self.split}_step{engine.step}_captions.json"
            )
            write_json_atomic(path, [{"image_id": i, "caption": c} for i, c in predictions.items()])
            self.log_samples(predictions, engine.step)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(result)
        return {self.split: result[0]}

    def log_samples(self, predictions: dict[int, str], step: int, count: int = 16) -> None:
        """A W&B table of sample captions with their references, when W&B is logging."""
        trackers = {t.name: t for t in self.accelerator.trackers}
        if "wandb" not in trackers:
            return
        rows = [
            [image_id, caption, " | ".join(self.references[image_id])]
            for image_id, caption in list(predictions.items())[:count]
        ]
        trackers["wandb"].log_table(
            f"{self.split}/samples",
            columns=["image_id", "caption", "references"],
            data=rows,
            step=step,
        )


def combine(*evaluators: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """One eval function running several evaluators (e.g. val and test) in order."""

    def evaluate(engine: Any) -> dict:
        results: dict = {}
        for evaluator in evaluators:
            results.update(evaluator(engine))
        return results

    return evaluate


def training_references(table: Any, tokenizer: Any) -> list[list[list[int]]]:
    """Token ids of every training caption, per image in table order, without BOS/EOS."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    refs = []
    for captions in table["captions"]:
        encoded = tokenizer(list(captions))["input_ids"]
        refs.append([[t for t in ids if t not in special] for ids in encoded])
    return refs


def build_reward_scorer(cfg: Config, table: Any, tokenizer: Any):
    """CIDEr-D (+ optional BLEU-4) over the training references; the document frequencies are
    cached next to the dataset (or in output_dir when that is read-only) and rebuilt if stale."""
    from .scoring import RewardScorer

    cache_dir = dataset_dir(cfg) / "cider_cache"
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError:
        cache_dir = Path(cfg.output_dir) / "cider_cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
    return RewardScorer.from_corpus(
        training_references(table, tokenizer),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        cache_path=cache_dir,
        cider_weight=cfg.scst.cider_weight,
        bleu_weight=cfg.scst.bleu_weight,
    )


def feature_dim(table: Any) -> int:
    """Region feature size of an image table (read from its schema, not from the data)."""
    return int(table.features["features"].shape[1])


def captioner_from_config(cfg: Config, tokenizer: Any, table: Any) -> torch.nn.Module:
    """The `model.kind` captioner sized by `model.<kind>`, with `model.weights` loaded if set."""
    from .checkpoint import load_weights
    from .models import build_captioner

    model = build_captioner(
        cfg.model.kind,
        vocab_size=len(tokenizer),
        feat_dim=feature_dim(table),
        max_len=cfg.decode.max_len,
        **cfg.model[cfg.model.kind],
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model


def caption_evaluation(cfg: Config, accelerator: Any, data: Any, tokenizer: Any) -> Callable:
    """`evaluate(engine) -> {split: metrics}` over `eval.splits` with `decode.*` beam search."""
    from .decoding import beam_search

    def decode(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
        return beam_search(
            model,
            enc,
            beam_size=cfg.decode.beam_size,
            max_len=cfg.decode.max_len,
            length_norm=float(cfg.decode.length_norm),
        ).sequences

    return combine(
        *(
            CaptionEvaluator(
                accelerator,
                data[split],
                tokenizer,
                split,
                decode=decode,
                collate_fn=image_collate(cfg),
                batch_size=cfg.eval.batch_size,
                metrics=cfg.eval.metrics,
            )
            for split in cfg.eval.splits
        )
    )
