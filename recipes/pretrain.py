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

Reads top to bottom: config, data, model, step, engine, evaluation, hooks, run, export.
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from xmodaler_accel import Engine, Event, build_train_loader, load_weights, sharding
from xmodaler_accel.checkpoint import rng_kept
from xmodaler_accel.config import ConfigError
from xmodaler_accel.data import dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.hooks import (
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.models.pretrain import build_pretrain_model, export_finetune_weights
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.pretraining import (
    PretrainPairs,
    collate_pretrain,
    load_pretrain_config,
    pretrain_metrics,
    pretrain_step,
)

logger = logging.getLogger("xmodaler_accel.recipes.pretrain")


def export(engine: Engine, directory: Path, build_model: Callable[[], torch.nn.Module]) -> None:
    """Write the fine-tuning weights (`export_finetune_weights`) from a plain copy of the model on
    the main process, whatever engine trained it (FSDP and ZeRO-3 gather its weights)."""
    weights = sharding.whole_weights(engine.accelerator, engine.model)  # every process calls it
    if engine.is_main_process:
        with rng_kept():  # building draws random initial weights
            model = build_model()
        model.load_state_dict(weights)
        paths = export_finetune_weights(model, directory)
        logger.info(
            "fine-tuning weights at step %d: %s", engine.step, sorted(map(str, paths.values()))
        )
    engine.accelerator.wait_for_everyone()


def main(args) -> None:
    cfg = load_pretrain_config(args.config, args.opts)
    accelerator = default_setup(cfg, args)  # train.grad_accum is known from here (YAML or launcher)
    if cfg.pretrain.two_stage == "separate" and cfg.train.grad_accum > 1:
        raise ConfigError(
            "pretrain.two_stage=separate takes an optimizer step per stage and does not support "
            "train.grad_accum > 1; use pretrain.two_stage=summed"
        )

    # Data: one item per (image, caption) pair, masked per (seed, epoch, pair) in the dataset.
    data = open_dataset(cfg)
    tokenizer = load_tokenizer(dataset_dir(cfg) / cfg.data.tokenizer)
    caption_tokenizer = load_tokenizer(dataset_dir(cfg) / cfg.data.caption_tokenizer)

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
    resolve_epochs(cfg, accelerator, train_loader)  # train.epochs, *.every_epochs -> steps

    # Model: understanding stream (model.single_stream) + generation stream (model.transformer).
    table = data["train"]
    build_model = partial(
        build_pretrain_model,
        cfg.model,
        feat_dim=table.features["features"].shape[1],
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        caption_vocab_size=len(caption_tokenizer),
        caption_ids=(bos, eos, caption_pad),
        # Detector classes of the `cls_prob` column (0 without one: feature regression only).
        num_region_classes=table.features["cls_prob"].shape[1]
        if "cls_prob" in table.features
        else 0,
        max_len=cfg.data.max_seq_len,
    )
    model = build_model()
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
        accelerator, model, optimizer, train_loader, step, scheduler=scheduler,
        max_steps=cfg.train.max_steps,
        clip_grad=cfg.train.clip_grad.mode, clip_grad_max=cfg.train.clip_grad.max,
        output_dir=cfg.output_dir,
        config=cfg,  # each checkpoint keeps the config that wrote it (--resume checks it)
        checkpoint_prefix=cfg.checkpoint.prefix, checkpoint_keep=cfg.checkpoint.keep,
        sync_every=cfg.train.log_every,
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
        with engine.gathered_model() as model:
            return {
                split: pretrain_metrics(
                    accelerator, model, loader, count, two_pass=two_pass, desc=f"eval {split}"
                )
                for split, (loader, count) in loaders.items()
            }

    # Hooks: timer, lr, checkpoints, evaluation, the export at the end, the writer.
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start).attach(engine)
    export_dir = Path(cfg.output_dir) / cfg.pretrain.export_dir
    engine.on(Event.TRAIN_END, partial(export, directory=export_dir, build_model=build_model))
    PeriodicWriter(cfg.train.log_every).attach(engine)

    # Run: --resume continues from the newest checkpoint; --eval-only evaluates once, then
    # re-exports trained weights (never random ones) and exits.
    if args.resume:
        engine.resume(evaluate_only=args.eval_only)
    if args.eval_only:
        eval_hook.evaluate(engine)
        if args.resume or cfg.model.weights:
            export(engine, export_dir, build_model)
        return
    engine.run()
    accelerator.end_training()


if __name__ == "__main__":
    # --num-gpus N starts N processes here (--num-machines/--machine-rank/--dist-url: several
    # machines); under `accelerate launch` or `torchrun` the launcher has started them.
    launch(main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,))
