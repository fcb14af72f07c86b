"""The seed's hooks on a real Engine, and hook state across resume."""

import json

import torch

from conftest import make_engine, regression_data
from xmodaler_accel import Event
from xmodaler_accel.checkpoint import list_checkpoints
from xmodaler_accel.hooks import (
    EMA,
    AutogradProfiler,
    CallbackHook,
    EvalHook,
    HookBase,
    IterationTimer,
    LRScheduler,
    ModelWeightsManipulating,
    PeriodicCheckpointer,
    PreciseBN,
    ScheduledSampling,
    register_hooks,
)


class XmodalerStyleHook(HookBase):
    """Written against detectron2/X-modaler's HookBase API; used here unchanged."""

    def __init__(self):
        self.calls = []

    def before_train(self):
        self.calls.append(("before_train", self.trainer.iter, self.trainer.max_iter))

    def before_step(self):
        self.calls.append(("before_step", self.trainer.iter))

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % 2 == 0:
            self.trainer.storage.put_scalars(custom_metric=float(next_iter))
        self.calls.append(("after_step", self.trainer.iter))

    def after_train(self):
        self.calls.append(("after_train", self.trainer.iter))


def test_hookbase_adapter_runs_a_seed_hook_unchanged(tmp_path):
    engine = make_engine(tmp_path, max_steps=3)
    hook = XmodalerStyleHook()
    register_hooks(engine, [hook])
    engine.run()
    assert hook.calls == [
        ("before_train", 0, 3),
        ("before_step", 0),
        ("after_step", 0),
        ("before_step", 1),
        ("after_step", 1),
        ("before_step", 2),
        ("after_step", 2),
        ("after_train", 2),
    ]
    assert engine.scalars["custom_metric"] == 2.0
    assert hook.trainer.model is engine.model


def test_callback_hook(tmp_path):
    engine = make_engine(tmp_path, max_steps=4)
    steps = []
    register_hooks(engine, [CallbackHook(after_step=lambda trainer: steps.append(trainer.iter))])
    engine.run()
    assert steps == [0, 1, 2, 3]


def test_iteration_timer_leaves_out_warmup(tmp_path):
    engine = make_engine(tmp_path, max_steps=10)
    timer = IterationTimer(warmup=3).attach(engine)
    engine.run()
    assert timer.timed_steps == 7
    assert timer.seconds_per_step > 0 and engine.scalars["time"] > 0


def test_periodic_checkpointer_keeps_newest_and_saves_final(tmp_path):
    engine = make_engine(tmp_path, max_steps=11)
    PeriodicCheckpointer(period=3, max_to_keep=2).attach(engine)
    engine.run()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [9, 11]


def test_lr_hook_logs_every_group(tmp_path):
    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=0.1)

    engine = make_engine(tmp_path, max_steps=2, optimizer_fn=two_groups)
    LRScheduler().attach(engine)
    engine.run()
    assert engine.scalars["lr"] == 0.1 and engine.scalars["lr_group1"] == 0.5


def test_eval_hook_writes_results_periodically_and_at_end(tmp_path):
    calls = []

    def evaluate(engine):
        assert not engine.unwrapped_model.training and not torch.is_grad_enabled()
        calls.append(engine.step)
        return {"val": {"score": float(engine.step)}}

    engine = make_engine(tmp_path, max_steps=7)
    EvalHook(evaluate, period=3).attach(engine)
    engine.run()
    assert calls == [3, 6, 7]
    result = json.loads((tmp_path / "eval" / "val_step6.json").read_text())
    assert result == {"split": "val", "step": 6, "metrics": {"score": 6.0}}
    assert engine.unwrapped_model.training


def test_ema_matches_direct_computation_and_swaps_back(tmp_path):
    model = torch.nn.Linear(8, 1)
    history = []
    engine = make_engine(tmp_path, model=model, max_steps=3)
    ema = EMA(decay=0.5).attach(engine)
    engine.on(Event.TRAIN_START, lambda e: history.append(model.weight.detach().clone()))
    engine.on(Event.STEP_END, lambda e: history.append(model.weight.detach().clone()))
    engine.run()
    expected = history[0]
    for w in history[1:]:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(ema.shadow["weight"], expected)
    trained = model.weight.detach().clone()
    with ema.swapped(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), trained)


def test_precise_bn_sets_exact_population_statistics(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )
    data = regression_data(64)
    batches = [data.tensors[0][i : i + 16] for i in range(0, 64, 16)]
    engine = make_engine(tmp_path, model=model, max_steps=2)
    PreciseBN(period=0, data_loader=batches, num_iter=4, forward=lambda m, b: m(b)).attach(engine)
    engine.run()
    with torch.no_grad():
        hidden = model[0](data.tensors[0])
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0), rtol=1e-5, atol=1e-6)


def test_model_weights_manipulating_freezes_at_step(tmp_path):
    model = torch.nn.Linear(8, 1)
    snapshots = {}

    def freeze(m):
        m.weight.requires_grad_(False)

    engine = make_engine(tmp_path, model=model, max_steps=6)
    ModelWeightsManipulating(freeze, steps=[4]).attach(engine)
    engine.on(
        Event.STEP_END, lambda e: snapshots.__setitem__(e.step, model.weight.detach().clone())
    )
    engine.run()
    assert not torch.equal(snapshots[2], snapshots[3])
    assert torch.equal(snapshots[3], snapshots[6])  # frozen before step 4 ran


def test_scheduled_sampling_raises_probability_per_epoch(tmp_path):
    model = torch.nn.Linear(8, 1)
    seen = {}
    engine = make_engine(tmp_path, model=model, batch_size=32, max_steps=10)  # 2 steps/epoch
    ScheduledSampling(start_epoch=0, increase_every=2, increase_prob=0.05, max_prob=0.1).attach(
        engine
    )
    engine.on(Event.EPOCH_START, lambda e: seen.__setitem__(e.epoch, model.ss_prob))
    engine.run()
    assert seen == {0: 0.0, 1: 0.0, 2: 0.05, 3: 0.05, 4: 0.1}


def test_autograd_profiler_traces_chosen_steps(tmp_path):
    engine = make_engine(tmp_path, max_steps=4)
    AutogradProfiler(lambda e: e.step + 1 == 3, tmp_path / "profiler").attach(engine)
    engine.run()
    assert [p.name for p in (tmp_path / "profiler").iterdir()] == ["step3_rank0.json"]


class Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, engine):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_hook_state_is_restored_on_resume(tmp_path):
    engine = make_engine(tmp_path, max_steps=6)
    counter, ema = Counter(), EMA(0.9)
    engine.on(Event.STEP_END, counter)
    ema.attach(engine)
    PeriodicCheckpointer(period=6).attach(engine)
    engine.run()

    resumed = make_engine(tmp_path, max_steps=9)
    counter2, ema2 = Counter(), EMA(0.9)
    resumed.on(Event.STEP_END, counter2)
    ema2.attach(resumed)
    assert resumed.resume()
    assert resumed.step == 6 and counter2.count == 6 and ema2.updates == 6
    torch.testing.assert_close(ema2.shadow["weight"], ema.shadow["weight"], rtol=0, atol=0)
    resumed.run()
    assert counter2.count == 9
