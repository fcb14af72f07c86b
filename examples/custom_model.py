"""recipes/xe.py with one thing changed: a captioner of your own (marked "CHANGED" below).

    python examples/custom_model.py --config recipes/synthetic.yaml train.max_steps=50 \
        output_dir=output/custom_model [--resume] [--eval-only]

Any `CaptionModel` works with the XE and SCST steps, beam search and the evaluator: implement
`encode` (once per image), teacher-forced `decode`, and the incremental `init_state` /
`decode_step`. `model.weights=` loads weights saved by this script (`--eval-only` scores them).
"""

from xmodaler_accel.cli import default_argument_parser

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()

from functools import partial

import torch
from torch import Tensor, nn

from xmodaler_accel import Engine, build_train_loader, load_weights
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
from xmodaler_accel.masking import masked_mean
from xmodaler_accel.models import CaptionModel, EncoderOutput
from xmodaler_accel.optim import build_lr_scheduler, build_optimizer
from xmodaler_accel.setup import default_setup, launch, resolve_epochs
from xmodaler_accel.tasks.captioning import (
    CaptionDataset,
    CaptionEvaluator,
    collate_xe,
    feature_dim,
    image_collate,
    load_caption_config,
    xe_step,
)


class GRUCaptioner(CaptionModel):
    """CHANGED: a GRU over the mean region feature with soft attention."""

    def __init__(self, vocab_size: int, feat_dim: int, hidden: int = 256, max_len: int = 20):
        super().__init__(vocab_size, max_len=max_len)
        self.project = nn.Linear(feat_dim, hidden)
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=self.pad_id)
        self.cell = nn.GRUCell(2 * hidden, hidden)
        self.predictor = nn.Linear(hidden, vocab_size)

    def encode(self, features: Tensor, boxes: Tensor, region_mask: Tensor) -> EncoderOutput:
        memory = torch.tanh(self.project(features))
        return EncoderOutput(
            memory=memory, mask=region_mask, pooled=masked_mean(memory, region_mask)
        )

    def init_state(self, enc: EncoderOutput) -> tuple[Tensor]:
        return (enc.per_row(enc.pooled),)

    def decode_step(self, enc: EncoderOutput, state: tuple[Tensor], tokens: Tensor):
        (hidden,) = state
        memory, mask = enc.per_row(enc.memory), enc.per_row(enc.mask)
        scores = (memory @ hidden.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, float("-inf"))
        context = (scores.softmax(-1).unsqueeze(-1) * memory).sum(1)
        hidden = self.cell(torch.cat([self.embed(tokens), context], -1), hidden)
        return self.predictor(hidden).log_softmax(-1), (hidden,)

    def decode(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        state, logits = self.init_state(enc), []
        for t in range(input_ids.shape[1]):
            log_probs, state = self.decode_step(enc, state, input_ids[:, t])
            logits.append(log_probs)
        return torch.stack(logits, 1)

    def decode_scheduled(self, enc: EncoderOutput, input_ids: Tensor) -> Tensor:
        return self.decode(enc, input_ids)  # no scheduled sampling in this example


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
    feat_dim = feature_dim(data["train"])
    model = GRUCaptioner(len(tokenizer), feat_dim, max_len=cfg.decode.max_len)  # CHANGED
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
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
