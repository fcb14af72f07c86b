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

from bisect import bisect_right
from functools import partial

from datasets import load_from_disk
from torch.optim.lr_scheduler import LambdaLR

from xmodaler_accel import Engine, build_train_loader, load_config, load_weights
from xmodaler_accel.captioning import DATASET_DEFAULTS, dataset_dir
from xmodaler_accel.config import DEFAULTS
from xmodaler_accel.data import load_tokenizer
from xmodaler_accel.hooks import EvalHook
from xmodaler_accel.models.vcr import build_vcr_model
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import (
    attach_default_hooks,
    attach_writer,
    default_argument_parser,
    default_setup,
    engine_options,
    run_or_evaluate,
)
from xmodaler_accel.steps.vcr import SecondLoader, VCRTaskDataset, collate_choices, vcr_step
from xmodaler_accel.vcr_eval import VCRSplit, evaluate_vcr

# The keys this recipe adds to the library's; the YAML files document each one.
VCR_DEFAULTS = {
    **DEFAULTS,
    "lr_scheduler": {**DEFAULTS["lr_scheduler"], "milestones": []},  # warmup_multistep
    "eval": {**DEFAULTS["eval"], "splits": ["val"]},
    "data": {
        **DATASET_DEFAULTS,
        "tokenizer": "wordpiece",
        "max_length_qa": 38,
        "max_length_qar": 66,
        "max_feat_num": 50,
        "use_global_v": False,
    },
    "model": {
        **DEFAULTS["model"],
        "ground_tags": True,
        "single_stream": {
            "bert_dir": "",
            "hidden": 768,
            "layers": 12,
            "heads": 12,
            "intermediate": 3072,
            "dropout": 0.1,
            "pooling": "cls",
        },
    },
    "vcr": {"mode": "sum", "qar_batch_size": 0},
}


def build_scheduler(cfg, optimizer):
    """`warmup_multistep` (X-modaler's WarmupMultiStepLR), else the library's schedules."""
    s = cfg.lr_scheduler
    if s.name != "warmup_multistep":
        return build_lr_scheduler(cfg, optimizer, cfg.train.max_steps)
    milestones = sorted(s.milestones)

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps > 0 else 1.0
        return warmup * s.gamma ** bisect_right(milestones, step)

    return LambdaLR(optimizer, factor)


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=VCR_DEFAULTS)
    accelerator = default_setup(cfg, args)

    # Data: the two sub-task views of the same items, each with its own shuffled loader.
    root = dataset_dir(cfg)
    data = load_from_disk(str(root))
    tokenizer = load_tokenizer(root / cfg.data.tokenizer)
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
    scheduler = build_scheduler(cfg, optimizer)
    qar_batches = SecondLoader(qar_loader, accelerator)
    step = partial(vcr_step, qar_loader=qar_batches, mode=cfg.vcr.mode)
    engine = Engine(
        accelerator, model, optimizer, qa_loader, step,
        scheduler=scheduler, **engine_options(cfg),
    )  # fmt: skip
    qar_batches.attach(engine, name="qar_loader")

    # Evaluation: Q->A, QA->R and Q->AR of every split, split across processes.
    def evaluate(engine: Engine) -> dict:
        return evaluate_vcr(
            engine.accelerator, engine.unwrapped_model, splits,
            batch_size=cfg.eval.batch_size, collate=collate,
        )  # fmt: skip

    attach_default_hooks(engine, cfg)
    eval_hook = EvalHook(evaluate, period=cfg.eval.every, start=cfg.eval.start).attach(engine)
    attach_writer(engine, cfg)
    run_or_evaluate(engine, args, eval_hook)


if __name__ == "__main__":
    main()
