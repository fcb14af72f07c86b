"""Train a captioner of your own through the XE recipe's pieces.

    python examples/custom_model.py --config recipes/synthetic.yaml train.max_steps=50

Any `CaptionModel` works with the XE and SCST steps, beam search and the evaluator: implement
`encode` (once per image), teacher-forced `decode`, and the incremental `init_state` /
`decode_step`. This one is a GRU over the mean region feature with soft attention.
"""

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import xe  # noqa: E402

from xmodaler_accel import load_config  # noqa: E402
from xmodaler_accel.captioning import CAPTION_DEFAULTS, feature_dim, open_dataset  # noqa: E402
from xmodaler_accel.models import CaptionModel, EncoderOutput, masked_mean  # noqa: E402
from xmodaler_accel.setup import attach_writer, default_argument_parser, default_setup  # noqa: E402


class GRUCaptioner(CaptionModel):
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


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=CAPTION_DEFAULTS)
    accelerator = default_setup(cfg, args)
    data, tokenizer = open_dataset(cfg)
    model = GRUCaptioner(len(tokenizer), feature_dim(data["train"]), max_len=cfg.decode.max_len)
    engine, evaluate = xe.build(cfg, accelerator, model=model)
    xe.attach_hooks(engine, cfg, evaluate)
    attach_writer(engine, cfg)
    engine.run()
    accelerator.end_training()


if __name__ == "__main__":
    main()
