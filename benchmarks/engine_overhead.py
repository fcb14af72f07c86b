"""Engine overhead: the Engine with its default hooks against a hand-written Accelerate loop.

Same model, data, optimizer and schedule; the two loops alternate over several repeats and the
median per-step time of each is compared. Two figures: the ratio on a ~5M-parameter MLP at batch
64 (goal <= 1.03x) and the absolute overhead per step on a tiny model (goal <= 200 us).

    .venv/bin/python benchmarks/engine_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from xmodaler_accel import Engine, build_train_loader
from xmodaler_accel.config import Config
from xmodaler_accel.hooks import IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter
from xmodaler_accel.writers import JSONLTracker


def mlp(dims: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def make_data(n: int, dim: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    return torch.utils.data.TensorDataset(x, torch.randn(n, 1, generator=gen))


def mse_step(engine: Engine, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": torch.nn.functional.mse_loss(engine.model(x), y)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hand_loop(accelerator, model, optimizer, scheduler, loader, steps: int) -> float:
    """The loop from Accelerate's examples, logging the loss every 20 steps."""
    sync()
    start, step = time.perf_counter(), 0
    while step < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % 20 == 0:
                accelerator.log({"loss": loss.item()}, step=step)
            if step == steps:
                break
    sync()
    return (time.perf_counter() - start) / steps


def engine_loop(engine: Engine, steps: int) -> float:
    engine.max_steps += steps
    sync()
    start = time.perf_counter()
    engine.run()
    sync()
    return (time.perf_counter() - start) / steps


def measure(accelerator, dims, batch, steps, repeats, out_dir) -> tuple[float, float, int]:
    data = make_data(batch * 50, dims[0])
    torch.manual_seed(0)
    hand_model, engine_model = mlp(dims), mlp(dims)
    engine_model.load_state_dict(hand_model.state_dict())
    hand_opt = torch.optim.Adam(hand_model.parameters(), lr=1e-4)
    hand_sched = torch.optim.lr_scheduler.LambdaLR(hand_opt, lambda s: 1.0)
    hand_model, hand_opt, hand_loader = accelerator.prepare(
        hand_model, hand_opt, build_train_loader(data, batch, seed=0)
    )
    engine_opt = torch.optim.Adam(engine_model.parameters(), lr=1e-4)
    cfg = Config(
        {
            "train": {"timer_warmup": 5, "log_every": 20},
            "checkpoint": {"every": 0, "keep": 1, "prefix": "step"},
        }
    )
    engine = Engine(
        accelerator,
        engine_model,
        engine_opt,
        build_train_loader(data, batch, seed=0),
        mse_step,
        max_steps=0,
        scheduler=torch.optim.lr_scheduler.LambdaLR(engine_opt, lambda s: 1.0),
        output_dir=out_dir,
        sync_every=20,
    )
    IterationTimer(cfg.train.timer_warmup).attach(engine)
    LRScheduler().attach(engine)
    PeriodicCheckpointer(cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.prefix).attach(
        engine
    )
    # The default hooks save a final checkpoint at TRAIN_END; time the loop, not the disk.
    engine.save_checkpoint = lambda *a, **k: None
    PeriodicWriter(cfg.train.log_every).attach(engine)
    hand_loop(accelerator, hand_model, hand_opt, hand_sched, hand_loader, 10)  # warm-up
    engine_loop(engine, 10)
    hand_times, engine_times = [], []
    for _ in range(repeats):
        hand_times.append(
            hand_loop(accelerator, hand_model, hand_opt, hand_sched, hand_loader, steps)
        )
        engine_times.append(engine_loop(engine, steps))
    params = sum(p.numel() for p in hand_model.parameters())
    return statistics.median(hand_times), statistics.median(engine_times), params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    logging.getLogger("xmodaler_accel").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = Accelerator(
            cpu=args.device == "cpu", log_with=[JSONLTracker(f"{tmp}/metrics.jsonl")]
        )
        accelerator.init_trackers("bench")
        hand_t, eng_t, params = measure(accelerator, [16, 16, 1], 8, 400, args.repeats, tmp)
        tiny_overhead_us = (eng_t - hand_t) * 1e6
        print(
            f"tiny MLP ({params} params, batch 8): hand {hand_t * 1e6:.1f} us/step, "
            f"engine {eng_t * 1e6:.1f} us/step, overhead {tiny_overhead_us:.1f} us/step"
        )
        hand_t, eng_t, params = measure(
            accelerator, [512, 2048, 2048, 1], 64, 40, args.repeats, tmp
        )
        ratio = eng_t / hand_t
        print(
            f"{params / 1e6:.1f}M-param MLP (batch 64): hand {hand_t * 1e3:.2f} ms/step, "
            f"engine {eng_t * 1e3:.2f} ms/step"
        )
        accelerator.end_training()
    print(
        f"ratio {ratio:.3f}x ({args.device}: Engine with default hooks vs hand-written Accelerate loop, "
        f"{params / 1e6:.1f}M-param MLP, batch 64; tiny model overhead {tiny_overhead_us:.0f} us/step)"
    )


if __name__ == "__main__":
    main()
