"""Self-critical sequence training (X-modaler's RLTrainer / RLBeamTrainer), on Accelerate.

    python recipes/scst.py --config recipes/synthetic.yaml model.weights=<XE checkpoint dir>
    accelerate launch recipes/scst.py --config recipes/coco.yaml model.weights=<...>

Starts from XE weights and reads the `scst:` section of the same YAML. The reward is CIDEr-D on
token ids against the training references (document frequencies cached next to the dataset).
"""

from functools import partial

from xmodaler_accel import Engine, Event, build_train_loader, load_config
from xmodaler_accel.captioning import (
    CAPTION_DEFAULTS,
    build_reward_scorer,
    caption_evaluation,
    captioner_from_config,
    image_collate,
    open_dataset,
)
from xmodaler_accel.data import ImageDataset
from xmodaler_accel.hooks import EvalHook
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import (
    attach_default_hooks,
    attach_writer,
    default_argument_parser,
    default_setup,
    engine_options,
    run_or_evaluate,
)
from xmodaler_accel.steps import scst_step, scst_time_split


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=CAPTION_DEFAULTS)
    # The scst: section replaces the XE run's output dir, length, batch and learning rate.
    scst = cfg.scst
    cfg.output_dir, cfg.train.max_steps = scst.output_dir, scst.max_steps
    cfg.train.batch_size, cfg.eval.every = scst.batch_size, scst.eval_every
    cfg.optim.lr, cfg.lr_scheduler.name, cfg.lr_scheduler.warmup_steps = scst.lr, "constant", 0
    if not cfg.model.weights and not args.resume:
        raise SystemExit("SCST starts from XE weights: pass model.weights=<checkpoint dir>")
    accelerator = default_setup(cfg, args)

    # Data: one row per image; rewards look up the image's training references by row index.
    data, tokenizer = open_dataset(cfg)
    train_loader = build_train_loader(
        ImageDataset(data["train"]),
        cfg.train.batch_size,
        seed=cfg.seed,
        collate_fn=image_collate(cfg),
        num_workers=cfg.train.num_workers,
        drop_last=cfg.train.drop_last,
    )
    scorer = build_reward_scorer(cfg, data["train"], tokenizer)

    model = captioner_from_config(cfg, tokenizer, data["train"])
    optimizer = build_optimizer(cfg, model)
    step = partial(
        scst_step,
        scorer=scorer,
        sampler=scst.sampler,
        baseline=scst.baseline,
        samples_per_image=scst.samples_per_image,
        max_len=cfg.decode.max_len,
        temperature=scst.temperature,
    )
    engine = Engine(
        accelerator,
        model,
        optimizer,
        train_loader,
        step,
        scheduler=build_lr_scheduler(cfg, optimizer, cfg.train.max_steps),
        **engine_options(cfg),
    )

    evaluate = caption_evaluation(cfg, accelerator, data, tokenizer)
    # Hooks: timer, lr, checkpoints, the SCST time split, evaluation, then the writer.
    attach_default_hooks(engine, cfg)
    engine.on(Event.STEP_END, scst_time_split)
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start).attach(engine)
    attach_writer(engine, cfg)

    run_or_evaluate(engine, args, eval_hook)


if __name__ == "__main__":
    main()
