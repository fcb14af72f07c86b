"""recipes/xe.py with one thing changed: two hooks of your own (marked "CHANGED" below).

    python examples/custom_hook.py --config recipes/synthetic.yaml train.max_steps=50 \
        output_dir=output/custom_hook [--resume] [--eval-only]

A hook is any `fn(engine)` subscribed to an event with a filter; a class written for X-modaler or
detectron2 (`HookBase` with `before_step/after_step`, `self.trainer`) plugs in through
`register_hooks` without edits.
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

import time
from functools import partial

from xmodaler_accel import Engine, Event, build_train_loader
from xmodaler_accel.data import dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.decoding import beam_search
from xmodaler_accel.hooks import (
    EMA,
    EvalHook,
    HookBase,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
    ScheduledSampling,
    register_hooks,
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


class ImagesPerSecond:
    """CHANGED: a plain callable that logs throughput since its last call."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def __call__(self, engine: Engine) -> None:
        now = time.perf_counter()
        if self.last is not None:
            steps, seconds = engine.step - self.last[0], now - self.last[1]
            grad_accum = engine.accelerator.gradient_accumulation_steps
            engine.scalars["images_per_s"] = steps * engine.global_batch_size * grad_accum / seconds
        self.last = (engine.step, now)


class LearningRateProbe(HookBase):
    """CHANGED: written against X-modaler's HookBase API (self.trainer, storage.put_scalar, iter)."""

    def __init__(self, period: int = 10):
        self.period = period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self.period == 0:
            lr = self.trainer.optimizer.param_groups[0]["lr"]
            self.trainer.storage.put_scalar("lr_x1000", lr * 1000)


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
    engine.on(Event.STEP_END, ImagesPerSecond(), every=cfg.train.log_every)  # CHANGED
    register_hooks(engine, [LearningRateProbe(period=cfg.train.log_every)])  # CHANGED
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
