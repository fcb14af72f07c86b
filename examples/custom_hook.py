"""Add your own hooks to the XE recipe: a plain callable and an X-modaler hook ported unchanged.

    python examples/custom_hook.py --config recipes/synthetic.yaml train.max_steps=50

A hook is any `fn(engine)` subscribed to an event with a filter; a class written for X-modaler or
detectron2 (`HookBase` with `before_step/after_step`, `self.trainer`) plugs in through
`register_hooks` without edits.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import xe  # noqa: E402  (the XE recipe's build/attach_hooks)

from xmodaler_accel import Engine, Event, load_config  # noqa: E402
from xmodaler_accel.captioning import CAPTION_DEFAULTS  # noqa: E402
from xmodaler_accel.hooks import HookBase, register_hooks  # noqa: E402
from xmodaler_accel.setup import attach_writer, default_argument_parser, default_setup  # noqa: E402


def images_per_second(engine: Engine) -> None:
    """A plain callable: throughput since the last call, logged with the other scalars."""
    now = time.perf_counter()
    last = getattr(images_per_second, "last", None)
    if last is not None:
        steps, seconds = engine.step - last[0], now - last[1]
        images = steps * engine.global_batch_size * engine.accelerator.gradient_accumulation_steps
        engine.scalars["images_per_s"] = images / seconds
    images_per_second.last = (engine.step, now)


class LossSpikeWarner(HookBase):
    """Written against X-modaler's HookBase API (self.trainer, storage.put_scalar, iter)."""

    def __init__(self, period: int = 10):
        self.period = period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self.period == 0:
            lr = self.trainer.optimizer.param_groups[0]["lr"]
            self.trainer.storage.put_scalar("lr_x1000", lr * 1000)


def main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    cfg = load_config(args.config, args.opts, defaults=CAPTION_DEFAULTS)
    accelerator = default_setup(cfg, args)
    engine, evaluate = xe.build(cfg, accelerator)
    xe.attach_hooks(engine, cfg, evaluate)
    engine.on(Event.STEP_END, images_per_second, every=cfg.train.log_every)
    register_hooks(engine, [LossSpikeWarner(period=cfg.train.log_every)])
    attach_writer(engine, cfg)  # last, so it logs what the hooks above put in engine.scalars
    engine.run()
    accelerator.end_training()


if __name__ == "__main__":
    main()
