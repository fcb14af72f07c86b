"""Image captioning with cross-entropy (X-modaler's DefaultTrainer), on Accelerate.

    python recipes/xe.py --config recipes/synthetic.yaml [--resume] [--eval-only] [key=value ...]
    accelerate launch recipes/xe.py --config recipes/coco.yaml

Reads top to bottom: config, data, model, step, engine, evaluation, hooks, run. Copy it to start
your own experiment: every piece below is a library call you can swap for your own.
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

from functools import partial

from xmodaler_accel import Engine, build_train_loader
from xmodaler_accel.data import dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.decoding import beam_search
from xmodaler_accel.hooks import (
    EMA,
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
    ScheduledSampling,
)
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.captioning import (
    CaptionDataset,
    CaptionEvaluator,
    captioner_from_config,
    collate_xe,
    image_collate,
    load_caption_config,
    xe_step,
)


def main(args) -> None:
    cfg = load_caption_config(args.config, args.opts)
    accelerator = default_setup(cfg, args)

    # Data: memory-mapped Arrow tables; each image comes with seq_per_img captions.
    data, tokenizer = open_dataset(cfg), load_tokenizer(dataset_dir(cfg))
    train_set = CaptionDataset(
        data["train"],
        tokenizer,
        max_seq_len=cfg.data.max_seq_len,
        seq_per_img=cfg.data.seq_per_img,
        seed=cfg.seed,
    )
    collate = partial(
        collate_xe,
        max_feat_num=cfg.data.max_feat_num,
        use_global_v=cfg.data.use_global_v,
        pad_multiple=cfg.data.pad_multiple,
    )
    train_loader = build_train_loader(
        train_set,
        cfg.train.batch_size,
        seed=cfg.seed,
        collate_fn=collate,
        num_workers=cfg.train.num_workers,
        drop_last=cfg.train.drop_last,
    )
    resolve_epochs(cfg, accelerator, train_loader)  # train.epochs, *.every_epochs -> steps

    # Model, optimizer, LR schedule (the Engine steps it once per optimizer step).
    model = captioner_from_config(cfg, tokenizer, data["train"])
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)

    # The step: teacher-forced label-smoothed cross-entropy, each image encoded once.
    step = partial(xe_step, label_smoothing=cfg.model.label_smoothing)
    engine = Engine(
        accelerator,
        model,
        optimizer,
        train_loader,
        step,
        scheduler=scheduler,
        max_steps=cfg.train.max_steps,
        clip_grad=cfg.train.clip_grad.mode,
        clip_grad_max=cfg.train.clip_grad.max,
        output_dir=cfg.output_dir,
        config=cfg,  # each checkpoint keeps the config that wrote it (--resume checks it)
        checkpoint_prefix=cfg.checkpoint.prefix,
        checkpoint_keep=cfg.checkpoint.keep,
        sync_every=cfg.train.log_every,  # host syncs (metrics, NaN checks) only this often
    )

    # Evaluation: beam search over each of eval.splits, coco-caption metrics.
    def decode(model, batch):
        enc = model.encode(batch["features"], batch["boxes"], batch["region_mask"])
        return beam_search(
            model,
            enc,
            beam_size=cfg.decode.beam_size,
            max_len=cfg.decode.max_len,
            length_norm=float(cfg.decode.length_norm),
        ).sequences

    evaluators = [
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
    ]

    def evaluate(engine: Engine) -> dict:
        return {split: m for evaluator in evaluators for split, m in evaluator(engine).items()}

    # Hooks run in the order attached; the writer logs after every STEP_END hook (Event.LOG).
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    # EMA before the checkpointer: a checkpoint holds this step's average.
    ema = EMA(cfg.train.ema_decay).attach(engine) if cfg.train.ema_decay > 0 else None
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
    ss, epoch = cfg.train.scheduled_sampling, engine.steps_per_epoch  # as X-modaler's build_hooks
    ScheduledSampling(ss.start_epoch * epoch, ss.every * epoch, ss.prob, ss.max_prob).attach(engine)
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start, ema=ema)
    eval_hook.attach(engine)
    PeriodicWriter(cfg.train.log_every).attach(engine)

    # Run: --resume continues from the newest checkpoint; --eval-only evaluates once and exits.
    if args.resume:
        engine.resume(evaluate_only=args.eval_only)
    if args.eval_only:
        eval_hook.evaluate(engine)
        return
    engine.run()
    accelerator.end_training()


if __name__ == "__main__":
    # --num-gpus N starts N processes here (--num-machines/--machine-rank/--dist-url: several
    # machines); under `accelerate launch` or `torchrun` the launcher has started them.
    launch(main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,))
