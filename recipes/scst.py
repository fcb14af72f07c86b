"""Self-critical sequence training (X-modaler's RLTrainer / RLBeamTrainer), on Accelerate.

    python recipes/scst.py --config recipes/synthetic.yaml [--resume] [--eval-only] [key=value ...]
    accelerate launch recipes/scst.py --config recipes/coco.yaml

Reads the XE run's YAML with one precedence rule: base YAML < its `scst:` section (overrides of the
same keys: output_dir, train.max_steps, optim.lr ...) < command-line overrides. Starts from
`model.weights`, or else from the newest checkpoint of the XE run of the same config. The `rl:`
section sets the step: sampler, baseline, samples per image, reward weights. The reward is CIDEr-D
on token ids against the training references (document frequencies cached next to the dataset).
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

from functools import partial

from xmodaler_accel import Engine, build_train_loader
from xmodaler_accel.data import ImageDataset, dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.decoding import beam_search
from xmodaler_accel.hooks import (
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.captioning import (
    CaptionEvaluator,
    SCSTTimeSplit,
    build_reward_scorer,
    captioner_from_config,
    image_collate,
    load_scst_config,
    scst_step,
)


def main(args) -> None:
    cfg = load_scst_config(args.config, args.opts)
    accelerator = default_setup(cfg, args)

    # Data: one row per image; rewards look up the image's training references by row index.
    data, tokenizer = open_dataset(cfg), load_tokenizer(dataset_dir(cfg))
    train_loader = build_train_loader(
        ImageDataset(data["train"]),
        cfg.train.batch_size,
        seed=cfg.seed,
        collate_fn=image_collate(cfg),
        num_workers=cfg.train.num_workers,
        drop_last=cfg.train.drop_last,
    )
    resolve_epochs(cfg, accelerator, train_loader)  # train.epochs, *.every_epochs -> steps
    scorer = build_reward_scorer(cfg, data["train"], tokenizer)

    # Model (from the XE weights), optimizer, LR schedule.
    model = captioner_from_config(cfg, tokenizer, data["train"])
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)

    # The step: sample (or beam) captions, reward minus baseline, policy gradient.
    rl = cfg.rl
    step = partial(
        scst_step,
        scorer=scorer,
        sampler=rl.sampler,
        baseline=rl.baseline,
        samples_per_image=rl.samples_per_image,
        max_len=cfg.decode.max_len,
        temperature=rl.temperature,
    )
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
        sync_every=cfg.train.log_every,
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

    # Hooks: timer, lr, checkpoints, the SCST time split, evaluation, the writer.
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
    SCSTTimeSplit().attach(engine)
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start).attach(engine)
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
