"""Visual commonsense reasoning: X-modaler's VCRTrainer (Q->A and QA->R in every step).

    python recipes/vcr.py --config recipes/synthetic_vcr.yaml [--resume] [--eval-only]
    torchrun --standalone --nproc_per_node 2 recipes/vcr.py --config recipes/synthetic_vcr.yaml
    accelerate launch recipes/vcr.py --config recipes/vcr.yaml      (GPUs)

One single-stream BERT scores each of an item's 4 candidates (4-way softmax cross-entropy). The
Engine's loader gives Q->A batches; a second loader gives QA->R batches inside the step, and its
position is checkpointed too. vcr.mode=sum adds the two losses (one update per step),
vcr.mode=alternate updates on each in turn as X-modaler does. Evaluation reports Q->A, QA->R and
Q->AR (both right). Reads top to bottom: config, data, model, step, engine, evaluation, hooks, run.
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

from functools import partial

from xmodaler_accel import Engine, build_train_loader, load_weights
from xmodaler_accel.data import dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.hooks import (
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.models.vcr import build_vcr_model
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.second_loader import SecondLoader
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.vcr import (
    VCRSplit,
    VCRTaskDataset,
    collate_choices,
    evaluate_vcr,
    load_vcr_config,
    vcr_step,
)


def main(args) -> None:
    cfg = load_vcr_config(args.config, args.opts)
    accelerator = default_setup(cfg, args)

    # Data: the two sub-task views of the same items, each with its own shuffled loader.
    data = open_dataset(cfg)
    tokenizer = load_tokenizer(dataset_dir(cfg) / cfg.data.tokenizer)
    qa_train = VCRTaskDataset.from_dict(
        data, "train", tokenizer, "qa", max_length=cfg.data.max_length_qa
    )
    qar_train = VCRTaskDataset.from_dict(
        data, "train", tokenizer, "qar", max_length=cfg.data.max_length_qar
    )
    collate = partial(
        collate_choices, max_feat_num=cfg.data.max_feat_num,
        use_global_v=cfg.data.use_global_v, pad_id=tokenizer.pad_token_id,
    )  # fmt: skip
    qa_loader = build_train_loader(
        qa_train, cfg.train.batch_size, seed=cfg.seed, collate_fn=collate,
        num_workers=cfg.train.num_workers, drop_last=cfg.train.drop_last,
    )  # fmt: skip
    resolve_epochs(cfg, accelerator, qa_loader)  # train.epochs, *.every_epochs -> steps
    qar_loader = build_train_loader(
        qar_train, cfg.vcr.qar_batch_size or cfg.train.batch_size, seed=cfg.seed + 1,
        collate_fn=collate, num_workers=cfg.train.num_workers, drop_last=cfg.train.drop_last,
    )  # fmt: skip
    lengths = {"max_length_qa": cfg.data.max_length_qa, "max_length_qar": cfg.data.max_length_qar}
    splits = [VCRSplit.from_dict(data, name, tokenizer, **lengths) for name in cfg.eval.splits]

    # Model: single-stream BERT + score head, tags grounded to their regions.
    model = build_vcr_model(
        cfg.model,
        feat_dim=data["train"].features["features"].shape[1],
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)

    # The step: Q->A from the Engine's loader, QA->R from the second loader (checkpointed).
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)
    qar_batches = SecondLoader(qar_loader, accelerator)
    step = partial(vcr_step, qar_loader=qar_batches, mode=cfg.vcr.mode)
    engine = Engine(
        accelerator, model, optimizer, qa_loader, step, scheduler=scheduler,
        max_steps=cfg.train.max_steps,
        clip_grad=cfg.train.clip_grad.mode, clip_grad_max=cfg.train.clip_grad.max,
        output_dir=cfg.output_dir,
        config=cfg,  # each checkpoint keeps the config that wrote it (--resume checks it)
        checkpoint_prefix=cfg.checkpoint.prefix, checkpoint_keep=cfg.checkpoint.keep,
        sync_every=cfg.train.log_every,
    )  # fmt: skip
    qar_batches.attach(engine, name="qar_loader")  # its position is saved under this name

    # Evaluation: Q->A, QA->R and Q->AR of every split, split across processes.
    def evaluate(engine: Engine) -> dict:
        with engine.gathered_model() as model:
            return evaluate_vcr(
                engine.accelerator,
                model,
                splits,
                batch_size=cfg.eval.batch_size,
                collate=collate,
                step=engine.step,
            )

    # Hooks: timer, lr, checkpoints, evaluation, the writer (it logs after all of them).
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
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
