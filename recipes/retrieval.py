"""Image-text retrieval: X-modaler's RetrievalTrainer and SingleStreamRetrievalTrainer[HardNegatives].

    python recipes/retrieval.py --config recipes/synthetic_retrieval.yaml [--resume] [--eval-only]
    python recipes/retrieval.py --config recipes/synthetic_retrieval.yaml model.kind=single_stream
    torchrun --standalone --nproc_per_node 2 recipes/retrieval.py --config recipes/flickr30k.yaml

model.kind=two_stream: region and text encoders into one space, VSE++ max-violation or InfoNCE,
negatives from the global batch. model.kind=single_stream: a BERT joint encoder with an ITM head,
each pair against in-batch negatives, random or mined by the model (train.hard_negatives=true).
Reads top to bottom: config, data, model, step, engine, evaluation, hooks, run.
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

import logging
from functools import partial

from xmodaler_accel import Engine, build_train_loader, load_weights
from xmodaler_accel.config import ConfigError
from xmodaler_accel.data import (
    PairDataset,
    collate_pairs,
    dataset_dir,
    load_tokenizer,
    open_dataset,
)
from xmodaler_accel.hooks import (
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.models.retrieval import build_retrieval_model, build_two_stream
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.retrieval import (
    EvalSettings,
    RetrievalSplit,
    evaluate_retrieval,
    itm_step,
    load_retrieval_config,
    retrieval_step,
)

logger = logging.getLogger("xmodaler_accel.recipes.retrieval")


def main(args) -> None:
    cfg = load_retrieval_config(args.config, args.opts)
    accelerator = default_setup(cfg, args)

    # Data: one training item per caption (Flickr30k protocol); eval splits tokenised once.
    data = open_dataset(cfg)
    tokenizer = load_tokenizer(dataset_dir(cfg) / cfg.data.tokenizer)
    train_set = PairDataset(data["train"], tokenizer, max_length=cfg.data.max_length)
    collate = partial(
        collate_pairs, max_feat_num=cfg.data.max_feat_num, pad_id=tokenizer.pad_token_id
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
    splits = [
        RetrievalSplit.from_table(
            name,
            data[name],
            tokenizer,
            max_length=cfg.data.max_length,
            max_images=cfg.retrieval.eval_images,
        )
        for name in cfg.eval.splits
    ]

    # Model (two_stream | single_stream), optionally from weights; a two-stream re-ranker.
    sizes = {
        "feat_dim": data["train"].features["features"].shape[1],
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
    }
    model = build_retrieval_model(cfg.model, **sizes)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    reranker = None
    if cfg.retrieval.rerank_k > 0:
        if not cfg.retrieval.rerank_weights:
            raise ConfigError(
                "retrieval.rerank_k > 0 re-ranks a trained two-stream model's top-k: set "
                "retrieval.rerank_weights to its checkpoint"
            )
        reranker = build_two_stream(cfg.model.two_stream, **sizes)
        load_weights(reranker, cfg.retrieval.rerank_weights)
        reranker.to(accelerator.device).eval()

    # The step: contrastive for two-stream, ITM with (hard) negatives for single-stream.
    if cfg.model.kind == "two_stream":
        step = partial(
            retrieval_step, loss=cfg.model.two_stream.loss, margin=cfg.model.two_stream.margin
        )
    else:
        if cfg.train.hard_negatives and not (cfg.model.weights or args.resume):
            logger.warning(
                "train.hard_negatives from random weights: mined negatives carry no signal "
                "until the model separates pairs; start from model.weights= (see the config)"
            )
        step = partial(
            itm_step,
            negatives=cfg.train.negatives,
            pool=cfg.train.negative_pool,
            hard=cfg.train.hard_negatives,
            side=cfg.train.negative_side,
        )
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)
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

    # Evaluation: every image against every caption, chunked and split across processes.
    settings = EvalSettings(
        batch_size=cfg.eval.batch_size,
        image_chunk=cfg.retrieval.image_chunk,
        similarity_chunk=cfg.retrieval.similarity_chunk,
        max_feat_num=cfg.data.max_feat_num,
        rerank_k=cfg.retrieval.rerank_k,
    )

    def evaluate(engine: Engine) -> dict:
        with engine.gathered_model() as model:
            return evaluate_retrieval(
                engine.accelerator, model, splits, settings, reranker, step=engine.step
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
