"""Vision-language pretraining (X-modaler's TDENPretrainer): masked language and region modelling,
image-text matching and caption generation, with TDEN's two-stage step.

    python recipes/pretrain.py --config recipes/synthetic_pretrain.yaml [--resume] [--eval-only]
    accelerate launch recipes/pretrain.py --config recipes/pretrain.yaml

At the end (and with --eval-only) the weights each fine-tuning recipe takes are written to
`<output_dir>/export/` and load there strictly with `model.weights=` (same sizes required):
    retrieval.safetensors  recipes/retrieval.py model.kind=single_stream (model.single_stream)
    vcr.safetensors        recipes/vcr.py (model.single_stream; token types grown to VCR's 3)
    captioner.safetensors  recipes/xe.py model.kind=transformer (model.transformer, same vocab)
    encoder.safetensors    a bare SingleStreamEncoder, for models of your own
A pretraining checkpoint itself (`checkpoints/step_<N>`) holds every head; loading it into a
fine-tuning model reports the keys that do not belong there by name.

Reads top to bottom: config, data, model, step, engine, evaluation, export, hooks, run.
"""

import logging
from functools import partial
from pathlib import Path

from datasets import load_from_disk
from torch.utils.data import DataLoader, Subset

from xmodaler_accel import Engine, Event, build_train_loader, load_config, load_weights
from xmodaler_accel.captioning import DATASET_DEFAULTS, dataset_dir
from xmodaler_accel.config import DEFAULTS, Config, ConfigError
from xmodaler_accel.data import load_tokenizer
from xmodaler_accel.hooks import EvalHook
from xmodaler_accel.models.pretrain import build_pretrain_model, export_finetune_weights
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import (
    attach_default_hooks,
    attach_writer,
    default_argument_parser,
    default_setup,
    engine_options,
    run_or_evaluate,
)
from xmodaler_accel.steps.pretrain import (
    PretrainPairs,
    collate_pretrain,
    pretrain_metrics,
    pretrain_step,
)

logger = logging.getLogger("xmodaler_accel.recipes.pretrain")

# The keys this recipe adds to the library's; the YAML files document each one.
PRETRAIN_DEFAULTS = {
    **DEFAULTS,
    "eval": {**DEFAULTS["eval"], "splits": ["val"]},
    "data": {
        **DATASET_DEFAULTS,
        "tokenizer": "wordpiece",
        "caption_tokenizer": "tokenizer",
        "max_length": 40,
        "max_seq_len": 20,
        "max_feat_num": 50,
    },
    "pretrain": {
        "two_stage": "separate",
        "mask_prob": 0.15,
        "region_mask_prob": 0.15,
        "label_smoothing": 0.0,
        "loss_weights": {
            "mlm": 1.0,
            "mrm_class": 1.0,
            "mrm_feature": 1.0,
            "itm": 1.0,
            "caption": 1.0,
        },
        "eval_pairs": 0,
        "export_dir": "export",
    },
}


def region_classes(table) -> int:
    """Detector classes of the `cls_prob` column (0 without one: feature regression only)."""
    return table.features["cls_prob"].shape[1] if "cls_prob" in table.features else 0


def build(cfg: Config, accelerator):
    """The pretraining engine and its evaluation function."""
    if cfg.pretrain.two_stage == "separate" and cfg.train.grad_accum > 1:
        raise ConfigError(
            "pretrain.two_stage=separate takes an optimizer step per stage and does not support "
            "train.grad_accum > 1; use pretrain.two_stage=summed"
        )
    # Data: one item per (image, caption) pair, masked per (seed, epoch, pair) in the dataset.
    root = dataset_dir(cfg)
    data = load_from_disk(str(root))
    tokenizer = load_tokenizer(root / cfg.data.tokenizer)
    caption_tokenizer = load_tokenizer(root / cfg.data.caption_tokenizer)

    def pairs(split: str) -> PretrainPairs:
        return PretrainPairs(
            data[split], tokenizer, caption_tokenizer,
            max_length=cfg.data.max_length, max_seq_len=cfg.data.max_seq_len,
            mask_prob=cfg.pretrain.mask_prob, region_mask_prob=cfg.pretrain.region_mask_prob,
            seed=cfg.seed,
        )  # fmt: skip

    train_set = pairs("train")
    bos, eos, caption_pad, _ = train_set.caption_ids
    collate = partial(
        collate_pretrain, max_feat_num=cfg.data.max_feat_num,
        pad_id=tokenizer.pad_token_id, caption_pad_id=caption_pad,
    )  # fmt: skip
    train_loader = build_train_loader(
        train_set, cfg.train.batch_size, seed=cfg.seed, collate_fn=collate,
        num_workers=cfg.train.num_workers, drop_last=cfg.train.drop_last,
    )  # fmt: skip

    # Model: understanding stream (model.single_stream) + generation stream (model.transformer).
    table = data["train"]
    model = build_pretrain_model(
        cfg.model,
        feat_dim=table.features["features"].shape[1],
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        caption_vocab_size=len(caption_tokenizer),
        caption_ids=(bos, eos, caption_pad),
        num_region_classes=region_classes(table),
        max_len=cfg.data.max_seq_len,
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)

    # The step: TDEN's two stages (pretrain.two_stage: separate | summed | off).
    step = partial(
        pretrain_step, two_stage=cfg.pretrain.two_stage,
        weights=cfg.pretrain.loss_weights.to_dict(), label_smoothing=cfg.pretrain.label_smoothing,
    )  # fmt: skip
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)
    engine = Engine(
        accelerator, model, optimizer, train_loader, step,
        scheduler=scheduler, **engine_options(cfg),
    )  # fmt: skip

    # Evaluation: accuracies of every head on the first pretrain.eval_pairs pairs of each split.
    loaders = {}
    for split in cfg.eval.splits:
        dataset = pairs(split)
        count = min(cfg.pretrain.eval_pairs or len(dataset), len(dataset))
        loader = DataLoader(Subset(dataset, range(count)), cfg.eval.batch_size, collate_fn=collate)
        loaders[split] = (accelerator.prepare_data_loader(loader), count)

    def evaluate(engine: Engine) -> dict:
        two_pass = cfg.pretrain.two_stage != "off"
        return {
            split: pretrain_metrics(
                accelerator, engine.unwrapped_model, loader, count, two_pass=two_pass
            )
            for split, (loader, count) in loaders.items()
        }

    return engine, evaluate


def export(engine: Engine, directory: Path) -> None:
    """Write the fine-tuning weights (`export_finetune_weights`) from the main process."""
    if engine.is_main_process:
        paths = export_finetune_weights(engine.unwrapped_model, directory)
        logger.info(
            "fine-tuning weights at step %d: %s", engine.step, sorted(map(str, paths.values()))
        )
    engine.accelerator.wait_for_everyone()


def attach_hooks(engine: Engine, cfg: Config, evaluate) -> EvalHook:
    """Timer, lr, checkpoints, evaluation and the export at the end (add the writer last)."""
    attach_default_hooks(engine, cfg)
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start).attach(engine)
    export_dir = Path(cfg.output_dir) / cfg.pretrain.export_dir
    engine.on(Event.TRAIN_END, partial(export, directory=export_dir))
    return eval_hook


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=PRETRAIN_DEFAULTS)
    accelerator = default_setup(cfg, args)
    engine, evaluate = build(cfg, accelerator)
    eval_hook = attach_hooks(engine, cfg, evaluate)
    attach_writer(engine, cfg)
    run_or_evaluate(engine, args, eval_hook)
    if args.eval_only and (args.resume or cfg.model.weights):  # never export random weights
        export(engine, Path(cfg.output_dir) / cfg.pretrain.export_dir)


if __name__ == "__main__":
    main()
