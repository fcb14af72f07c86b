"""GPU checks for the Engine (run where CUDA is available):

1. No host synchronisation between log periods, in bf16: training runs under
   `torch.cuda.set_sync_debug_mode("error")`, relaxed only inside the Engine's sync points
   (`collect_metrics`, `check_finite`). Default hooks, EMA, clipping by norm and a scheduler on.
2. bf16 against fp32 step time for a Transformer encoder (d_model 1024, 8 layers, 64 x 128 tokens).
3. Engine overhead against a hand-written Accelerate loop on the GPU.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import traceback

import torch

from xmodaler_accel import Engine, build_train_loader
from xmodaler_accel.config import DEFAULTS, Config
from xmodaler_accel.hooks import (
    EMA,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.setup import make_accelerator

VOCAB, SEQ, BATCH = 1000, 128, 64


class Encoder(torch.nn.Module):
    """Token ids in (cheap to load), so that step time is the GPU's work, not the loader's."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)
        layer = torch.nn.TransformerEncoderLayer(d, 16, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(d, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def step(engine: Engine, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    pred = engine.model(x).float()
    loss = torch.nn.functional.mse_loss(pred, y)
    return {"loss": loss, "abs_err": (pred - y).abs().mean()}


def build(precision: str, out: str, max_steps: int, step_fn=step) -> Engine:
    cfg = Config(DEFAULTS)
    cfg.mixed_precision = precision
    cfg.output_dir = out
    cfg.train.log_every = 20
    accelerator = make_accelerator(cfg)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, VOCAB, (BATCH * 20, SEQ), generator=gen),
        torch.randn(BATCH * 20, 1, generator=gen),
    )
    torch.manual_seed(0)
    model = Encoder(d=1024, layers=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    engine = Engine(
        accelerator,
        model,
        optimizer,
        build_train_loader(data, BATCH, seed=0),
        step_fn,
        max_steps=max_steps,
        clip_grad="norm",
        clip_grad_max=1.0,
        output_dir=out,
        sync_every=20,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10)),
    )
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
    EMA(0.999).attach(engine)
    PeriodicWriter(cfg.train.log_every).attach(engine)
    engine.save_checkpoint = lambda *a, **k: None  # time the loop, not the disk
    return engine


def relax_at_sync_points(engine: Engine) -> None:
    depth = [0]
    for name in ("collect_metrics", "check_finite"):
        original = getattr(engine, name)

        def wrapped(*args, _original=original, **kwargs):
            depth[0] += 1
            torch.cuda.set_sync_debug_mode("default")
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    torch.cuda.set_sync_debug_mode("error")

        setattr(engine, name, wrapped)


def syncing_step(engine: Engine, batch) -> dict[str, torch.Tensor]:
    out = step(engine, batch)
    # A device-to-host copy inside the step: the check must catch it.
    out["abs_err"].detach().cpu()
    return out


def sync_check(out: str) -> None:
    engine = build("bf16", out, max_steps=60)
    relax_at_sync_points(engine)
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.run()
        print("sync check: PASS - 60 bf16 steps, no host sync outside the 3 log periods")
    except RuntimeError:
        print("sync check: FAIL")
        traceback.print_exc()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def negative_control(out: str) -> None:
    engine = build("bf16", out, max_steps=3, step_fn=syncing_step)
    relax_at_sync_points(engine)
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.run()
        print("negative control: NOT caught (the check is blind)")
    except RuntimeError as err:
        print(f"negative control: caught a device-to-host copy in a step ({err})")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def timed(precision: str, out: str, steps: int = 20, repeats: int = 3) -> float:
    times = []
    engine = build(precision, out, max_steps=10)
    engine.run()  # warm-up
    for _ in range(repeats):
        engine.max_steps += steps
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def main() -> None:
    logging.getLogger("xmodaler_accel").setLevel(logging.WARNING)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    with tempfile.TemporaryDirectory() as out:
        sync_check(out)
        reset()
        negative_control(out)
        results = {}
        for precision in ("no", "bf16"):
            reset()
            results[precision] = timed(precision, out)
            print(
                f"{precision:>4}: {results[precision] * 1e3:.2f} ms/step "
                f"({64 / results[precision]:.0f} samples/s)"
            )
    print(
        f"ratio {results['no'] / results['bf16']:.2f}x (bf16 vs fp32 step time, Transformer "
        "encoder d1024 x 8 layers, batch 64 x 128 tokens, Engine with default hooks + EMA)"
    )


if __name__ == "__main__":
    main()
