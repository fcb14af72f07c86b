"""Captioning evaluation: beam-search a split, gather one caption per image from all processes
(duplicates from padded samplers dropped, coverage checked), score with the coco-caption metrics
on the main process and write `eval/<split>_step<N>_captions.json` (COCO results format).

The metrics are checked when the evaluator is built, before training: an unknown name, or METEOR
without Java or pycocoevalcap's jar, stops the run there (`check_caption_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader

from ...config import ConfigError
from ...data import ImageDataset
from ...evaluation import gather_predictions, write_json_atomic
from ...metrics import score_captions
from ...metrics.caption import check_metrics
from ...metrics.meteor import MeteorUnavailable
from ...progress import progress_bar
from ...writers import wandb_tracker

logger = logging.getLogger(__name__)


def reference_captions(table: Any) -> list[list[str]]:
    """Each image's references as written (`raw_captions`), which `score_captions` PTB-tokenises
    as coco-caption and X-modaler do, so scores compare with published ones. A store without
    raw captions falls back to the normalised `captions`, with a warning."""
    if "raw_captions" in table.column_names:
        raw = table["raw_captions"]
        if all(raw):
            return raw
    logger.warning(
        "the evaluation split has no raw reference captions: scoring against the normalised "
        "`captions` column, so the scores are not comparable with published ones"
    )
    return table["captions"]


_WITHOUT_METEOR = ("bleu", "rouge", "cider")  # the default metrics, METEOR left out


def check_caption_metrics(
    accelerator: Any, metrics: Sequence[str], key: str = "eval.metrics"
) -> None:
    """A ConfigError naming `key` unless every metric can be computed: an unknown name, or
    METEOR without Java or pycocoevalcap's jar (what to install, or the value of `key` without
    meteor). The main process, which scores, checks; every process gets the answer (collective
    when there are several) and raises the same error."""
    problem: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            check_metrics(metrics)
        except ValueError as err:
            problem[0] = f"config key '{key}': {err}"
        except MeteorUnavailable as err:
            rest = [str(m) for m in metrics if str(m).lower() != "meteor"] or list(_WITHOUT_METEOR)
            problem[0] = (
                f"config key '{key}' includes meteor: {err}; or leave METEOR out: "
                f"{key}=[{','.join(rest)}]"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise ConfigError(problem[0])


class CaptionEvaluator:
    """`evaluator(engine) -> {split: metrics}`: beam-search a split and score it (collective).

    Building one checks that `metrics` can all be computed here (`check_caption_metrics`)."""

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
        check_caption_metrics(accelerator, self.metrics)
        loader = DataLoader(
            ImageDataset(table), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
        )
        self.loader = accelerator.prepare_data_loader(loader)
        self.references = dict(zip(table["image_id"], reference_captions(table)))

    def predict(self, model: torch.nn.Module) -> dict[int, str]:
        ids: list[int] = []
        captions: list[str] = []
        progress = progress_bar(
            self.loader,
            desc=f"eval {self.split}",
            unit="batch",
            main_process=self.accelerator.is_local_main_process,
        )
        for batch in progress:
            tokens = self.decode(model, batch)
            captions += self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
            ids += batch["image_ids"].tolist()
        return gather_predictions(self.accelerator, ids, captions, list(self.references))

    def __call__(self, engine: Any) -> dict[str, dict[str, float]]:
        with engine.gathered_model() as model:
            predictions = self.predict(model)
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
        tracker = wandb_tracker(self.accelerator)
        if tracker is None:
            return
        rows = [
            [image_id, caption, " | ".join(self.references[image_id])]
            for image_id, caption in list(predictions.items())[:count]
        ]
        tracker.log_table(
            f"{self.split}/samples",
            columns=["image_id", "caption", "references"],
            data=rows,
            step=step,
        )
