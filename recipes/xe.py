"""Image captioning with cross-entropy (X-modaler's DefaultTrainer), on Accelerate.

    python recipes/xe.py --config recipes/synthetic.yaml [--resume] [--eval-only] [key=value ...]
    accelerate launch recipes/xe.py --config recipes/coco.yaml

Reads top to bottom: data, model, optimizer, engine, evaluation, hooks, run. Copy it to start
your own, or import `build` from it (examples/custom_model.py does) to reuse the pieces.
"""

from collections.abc import Callable
from functools import partial

import torch

from xmodaler_accel import Engine, build_train_loader, load_config
from xmodaler_accel.captioning import (
    CAPTION_DEFAULTS,
    caption_evaluation,
    captioner_from_config,
    open_dataset,
)
from xmodaler_accel.config import Config
from xmodaler_accel.data import CaptionDataset, collate_xe
from xmodaler_accel.hooks import EMA, EvalHook, ScheduledSampling
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import (
    attach_default_hooks,
    attach_writer,
    default_argument_parser,
    default_setup,
    engine_options,
    run_or_evaluate,
)
from xmodaler_accel.steps import xe_step


def build(
    cfg: Config, accelerator, model: torch.nn.Module | None = None
) -> tuple[Engine, Callable]:
    """The XE engine and its evaluation function; `model` replaces the configured captioner."""
    # Data: memory-mapped Arrow tables; each image comes with seq_per_img captions.
    data, tokenizer = open_dataset(cfg)
    train_set = CaptionDataset(
        data["train"],
        tokenizer,
        max_seq_len=cfg.data.max_seq_len,
        seq_per_img=cfg.data.seq_per_img,
        seed=cfg.seed,
    )
    collate = partial(
        collate_xe, max_feat_num=cfg.data.max_feat_num, use_global_v=cfg.data.use_global_v
    )
    train_loader = build_train_loader(
        train_set,
        cfg.train.batch_size,
        seed=cfg.seed,
        collate_fn=collate,
        num_workers=cfg.train.num_workers,
        drop_last=cfg.train.drop_last,
    )

    # Model (or the one given), optimizer, schedule (stepped once per optimizer step).
    model = model or captioner_from_config(cfg, tokenizer, data["train"])
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)
    engine = Engine(
        accelerator,
        model,
        optimizer,
        train_loader,
        partial(xe_step, label_smoothing=cfg.model.label_smoothing),
        scheduler=scheduler,
        **engine_options(cfg),
    )
    # Evaluation: beam search over each of eval.splits, coco-caption metrics.
    evaluate = caption_evaluation(cfg, accelerator, data, tokenizer)
    return engine, evaluate


def attach_hooks(engine: Engine, cfg: Config, evaluate: Callable) -> EvalHook:
    """Timer, lr, checkpoints, scheduled sampling, EMA and evaluation (add the writer last)."""
    attach_default_hooks(engine, cfg)
    ss = cfg.train.scheduled_sampling
    ScheduledSampling(ss.start_epoch, ss.every, ss.prob, ss.max_prob).attach(engine)
    ema = EMA(cfg.train.ema_decay).attach(engine) if cfg.train.ema_decay > 0 else None
    return EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start, ema=ema).attach(engine)


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=CAPTION_DEFAULTS)
    accelerator = default_setup(cfg, args)
    engine, evaluate = build(cfg, accelerator)
    eval_hook = attach_hooks(engine, cfg, evaluate)
    attach_writer(engine, cfg)
    run_or_evaluate(engine, args, eval_hook)


if __name__ == "__main__":
    main()
