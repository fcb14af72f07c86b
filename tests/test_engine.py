"""The Engine loop: accumulation, clipping, scheduling, no host syncs, non-finite losses."""

import contextlib
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_engine, mse_step
from xmodaler_accel import Event, NonFiniteLossError
from xmodaler_accel.checkpoint import list_checkpoints
from xmodaler_accel.hooks import (
    EMA,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from xmodaler_accel.step_metrics import StepMetrics
from xmodaler_accel.stop_signal import StopSignal


def test_grad_accumulation_2x_half_batch_equals_full_batch(tmp_path):
    full = make_engine(tmp_path / "a", batch_size=8, max_steps=12)
    full.run()
    accum = make_engine(tmp_path / "b", batch_size=4, grad_accum=2, max_steps=12)
    accum.run()
    assert accum.step == full.step == 12
    for a, b in zip(full.unwrapped_model.parameters(), accum.unwrapped_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scheduler_steps_once_per_optimizer_step(tmp_path):
    seen = []

    def opt(params):
        return torch.optim.SGD(params, lr=1.0)

    engine = make_engine(tmp_path, batch_size=4, grad_accum=2, max_steps=5, optimizer_fn=opt)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(
        engine.optimizer.optimizer, lambda s: 0.5**s
    )
    engine.on(Event.STEP_START, lambda e: seen.append(e.optimizer.param_groups[0]["lr"]))
    engine.run()
    assert seen == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert engine.scheduler.last_epoch == 5


def test_clip_by_value_bounds_every_update(tmp_path):
    model = torch.nn.Linear(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    engine = make_engine(
        tmp_path,
        model=model,
        max_steps=1,
        clip_grad="value",
        clip_grad_max=0.1,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=1.0),
    )
    engine.run()
    for old, new in zip(before, model.parameters()):
        assert (old - new.detach()).abs().max() <= 0.1 + 1e-7
        assert (old - new.detach()).abs().max() > 0.09  # the raw gradients were larger


def test_clip_by_norm_reports_grad_norm(tmp_path):
    engine = make_engine(tmp_path, max_steps=4, clip_grad="norm", clip_grad_max=1.0)
    engine.run()
    metrics = engine.collect_metrics()
    assert metrics["grad_norm"] > 1.0  # pre-clipping norm, averaged over the steps


def test_epochs_reshuffle_and_iterate_with_set_epoch(tmp_path):
    orders = {}
    engine = make_engine(tmp_path, batch_size=16, max_steps=8)  # 4 steps per epoch
    engine.on(Event.STEP_START, lambda e: orders.setdefault(e.epoch, []).append(e.step))
    engine.run()
    assert orders == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert not torch.equal(
        engine.sampler.order(), (engine.sampler.set_epoch(0), engine.sampler.order())[1]
    )


def test_step_function_without_loss_is_named(tmp_path):
    def no_loss(engine, batch):
        return {"total": torch.zeros(())}

    engine = make_engine(tmp_path, step_fn=no_loss)
    with pytest.raises(KeyError, match="no_loss must return a dict with 'loss'"):
        engine.run()


def test_loader_without_resumable_sampler_is_refused(tmp_path):
    from accelerate import Accelerator

    from xmodaler_accel import Engine

    loader = torch.utils.data.DataLoader(torch.arange(4), shuffle=True)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(TypeError, match="ResumableSampler"):
        Engine(
            Accelerator(cpu=True),
            model,
            torch.optim.SGD(model.parameters(), 0.1),
            loader,
            mse_step,
            max_steps=1,
        )


def test_non_finite_loss_names_step_and_term_and_writes_no_checkpoint(tmp_path):
    def exploding(engine, batch):
        out = mse_step(engine, batch)
        if engine.step + 1 == 7:  # the 7th step's aux term blows up
            out["aux"] = torch.tensor(float("inf"))
            out["loss"] = out["loss"] + out["aux"]
        else:
            out["aux"] = torch.zeros(())
        return out

    engine = make_engine(tmp_path, step_fn=exploding, max_steps=20, sync_every=50)
    PeriodicCheckpointer(4).attach(engine)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 7 in: aux, loss \(detected at step 8\)"
    ):
        engine.run()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4]


# ---------------------------------------------------------------- host synchronisation
class HostSync(AssertionError):
    pass


SYNC_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__repr__",
    "__format__",
)


@contextlib.contextmanager
def forbid_host_sync():
    """Make every tensor-to-host conversion raise, except inside the allowed sync points."""
    allowed = {"depth": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def guard(name):
        def method(self, *args, **kwargs):
            if allowed["depth"] == 0:
                raise HostSync(f"tensor.{name}() in the training step path")
            return originals[name](self, *args, **kwargs)

        return method

    @contextlib.contextmanager
    def sync_point():
        allowed["depth"] += 1
        try:
            yield
        finally:
            allowed["depth"] -= 1

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield sync_point
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def allow_at_sync_points(engine, sync_point):
    # Fetching a batch is host work by nature (torch's loader draws a seed with .item() at each
    # epoch start); on CUDA, the GPU check covers it with torch.cuda.set_sync_debug_mode.
    for name in ("collect_metrics", "check_finite", "_next_batch"):
        original = getattr(engine, name)

        def wrapped(*args, _original=original, **kwargs):
            with sync_point():
                return _original(*args, **kwargs)

        setattr(engine, name, wrapped)


def test_no_host_sync_between_log_periods(tmp_path):
    engine = make_engine(
        tmp_path,
        max_steps=30,
        clip_grad="norm",
        clip_grad_max=1.0,
        sync_every=10,
        model=torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
        ),
    )
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(
        engine.optimizer.optimizer, lambda s: 1 / (1 + s)
    )
    IterationTimer(2).attach(engine)
    LRScheduler().attach(engine)
    EMA(0.9).attach(engine)
    writer = PeriodicWriter(10).attach(engine)
    logged = []
    engine.accelerator.log = lambda values, step: logged.append((step, values["loss"]))
    with forbid_host_sync() as sync_point:
        allow_at_sync_points(engine, sync_point)
        engine.run()
    assert [s for s, _ in logged] == [10, 20, 30] and writer.last_written == 30
    assert all(isinstance(v, float) for _, v in logged)


def test_sync_detector_catches_item_in_a_step(tmp_path):
    def syncing_step(engine, batch):
        out = mse_step(engine, batch)
        out["loss"].item()
        return out

    engine = make_engine(tmp_path, step_fn=syncing_step, max_steps=2)
    with forbid_host_sync() as sync_point, pytest.raises(HostSync, match=r"tensor.item\(\)"):
        allow_at_sync_points(engine, sync_point)
        engine.run()


def test_collect_metrics_averages_since_last_call(tmp_path):
    values = iter(range(1, 100))

    def counting(engine, batch):
        out = mse_step(engine, batch)
        out["k"] = torch.tensor(float(next(values)))
        return out

    engine = make_engine(tmp_path, step_fn=counting, max_steps=4)
    seen = []
    engine.on(Event.STEP_END, lambda e: seen.append(e.collect_metrics()["k"]), every=2)
    engine.run()
    assert seen == [1.5, 3.5]


# ---------------------------------------------------------------- the loop's parts
def test_engine_module_is_a_loop_read_at_once():
    import xmodaler_accel.engine

    assert len(Path(xmodaler_accel.engine.__file__).read_text().splitlines()) <= 315


def test_worker_seed_depends_on_seed_epoch_and_position_only(tmp_path):
    def expected_generator(engine):
        seed = 3 * 1_000_003 + engine.epoch * 7919 + engine.samples_in_epoch  # loader seed=3
        return torch.Generator().manual_seed(seed).get_state()

    def check(engine):
        assert engine.sampler.epoch == engine.epoch
        assert torch.equal(engine.train_loader.generator.get_state(), expected_generator(engine))
        seen.append((engine.epoch, engine.samples_in_epoch))

    seen = []
    engine = make_engine(tmp_path, batch_size=16, max_steps=6)  # 4 steps per epoch
    engine.on(Event.EPOCH_START, check)
    PeriodicCheckpointer(period=6).attach(engine)
    engine.run()
    resumed = make_engine(tmp_path, batch_size=16, max_steps=8)
    resumed.on(Event.EPOCH_START, check)
    resumed.resume()
    resumed.run()
    assert seen == [(0, 0), (1, 0), (1, 32)]


def test_step_time_covers_every_micro_step_and_leaves_hooks_out(tmp_path):
    def slow_step(engine, batch):
        time.sleep(0.03)
        return mse_step(engine, batch)

    engine = make_engine(tmp_path, batch_size=4, grad_accum=2, max_steps=2, step_fn=slow_step)
    engine.on(Event.STEP_START, lambda e: time.sleep(0.2))
    engine.on(Event.STEP_END, lambda e: time.sleep(0.2))
    times = []
    engine.on(Event.STEP_END, lambda e: times.append(e.step_time))
    engine.run()
    assert len(times) == 2 and all(0.06 <= t < 0.2 for t in times), times


def test_step_metrics_average_each_output_over_the_steps_that_had_it():
    accelerator = SimpleNamespace(
        reduce=lambda t, reduction: t, gather=lambda t: t, num_processes=1
    )
    metrics = StepMetrics(torch.device("cpu"))
    metrics.add({"loss": torch.tensor(1.0), "aux": torch.tensor([2.0, 4.0])})
    metrics.end_step()
    metrics.add({"loss": torch.tensor(3.0), "label": "not a tensor"})
    metrics.end_step()
    assert metrics.collect(accelerator) == {"aux": 3.0, "loss": 2.0}
    assert metrics.collect(accelerator) == {}  # since the last call


def test_step_metrics_name_the_first_non_finite_step_and_carry_a_flag():
    accelerator = SimpleNamespace(gather=lambda t: t, num_processes=1)
    metrics = StepMetrics(torch.device("cpu"))
    metrics.start_at(10)  # resumed after step 10
    for value in (1.0, float("nan"), float("inf")):
        metrics.add({"loss": torch.tensor(value), "aux": torch.tensor(0.0)})
        metrics.end_step()
    assert metrics.first_non_finite(accelerator, flag=True) == ({"loss": 12}, True)
    error = NonFiniteLossError.at({"loss": 12}, detected_at=13)
    assert str(error).startswith("non-finite loss at step 12 in: loss (detected at step 13)")


def test_stop_signal_waits_for_the_step_then_a_second_signal_stops_now():
    stop = StopSignal()
    previous = signal.getsignal(signal.SIGTERM)
    with stop.caught():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received and stop.name == "SIGTERM"
        assert stop.should_stop(step=3, sync_every=5, world_size=1)
        assert not stop.should_stop(step=5, sync_every=5, world_size=2)  # not agreed yet
        stop.agreed = True
        assert not stop.should_stop(step=6, sync_every=5, world_size=2)  # not a sync point
        assert stop.should_stop(step=10, sync_every=5, world_size=2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous
