"""The seed's hooks on a real Engine, and hook state across resume."""

import json
import time

import pytest
import torch

from conftest import make_engine, mse_step, regression_data
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
    PeriodicWriter,
    PreciseBN,
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
        ("after_train", 3),  # max_iter after a finished run, as X-modaler
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


def test_iteration_timer_reports_step_time_without_slow_hooks(tmp_path):
    def slow_step(engine, batch):
        time.sleep(0.01)
        return mse_step(engine, batch)

    engine = make_engine(tmp_path, max_steps=3, step_fn=slow_step)
    engine.on(Event.STEP_END, lambda e: time.sleep(0.2))  # runs before the timer's STEP_END
    timer = IterationTimer(warmup=0).attach(engine)
    engine.on(Event.STEP_START, lambda e: time.sleep(0.2))  # subscribed after the timer
    seen = []
    engine.on(Event.STEP_END, lambda e: seen.append((e.scalars["time"], e.step_time)))
    engine.run()
    assert [t for t, _ in seen] == [s for _, s in seen]  # time is the engine's step_time
    assert all(0.01 <= t < 0.2 for t, _ in seen), seen  # the 0.2 s hooks are left out
    assert timer.timed_steps == 3 and timer.total_time == pytest.approx(sum(t for t, _ in seen))
    assert engine.scalars["data_time"] == engine.data_time


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
    assert engine.eval_results == {}
    EvalHook(evaluate, period=3).attach(engine)
    seen_at_eval = []
    engine.on(Event.EVAL, lambda e: seen_at_eval.append(e.eval_results))
    engine.run()
    assert calls == [3, 6, 7]
    assert seen_at_eval == [{"val": {"score": s}} for s in (3.0, 6.0, 7.0)]
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


def test_precise_bn_leaves_the_training_rng_where_it_was(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1)
    )
    data = regression_data(64)
    loader = torch.utils.data.DataLoader(data.tensors[0], batch_size=16, shuffle=True)
    engine = make_engine(tmp_path, model=model, max_steps=2)
    hook = PreciseBN(period=0, data_loader=loader, num_iter=4, forward=lambda m, b: m(b))
    before, stats = torch.get_rng_state(), model[1].running_mean.clone()
    hook(engine)  # a shuffled loader and dropout in train mode: both draw from the global RNG
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(model[1].running_mean, stats)


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


# ---------------------------------------------------------------- hook state names
def scores_of(split):
    def evaluate(engine):
        return {split: {"step": float(engine.step)}}

    return evaluate


def test_eval_hooks_get_their_own_state_back_when_attached_in_reverse_order(tmp_path):
    engine = make_engine(tmp_path, max_steps=6)
    EvalHook(scores_of("a"), period=2).attach(engine, name="eval_a")
    EvalHook(scores_of("b"), period=3).attach(engine, name="eval_b")
    PeriodicCheckpointer(period=6).attach(engine)
    engine.run()

    resumed = make_engine(tmp_path, max_steps=6)
    hook_b = EvalHook(scores_of("b"), period=3).attach(resumed, name="eval_b")
    hook_a = EvalHook(scores_of("a"), period=2).attach(resumed, name="eval_a")
    assert resumed.resume()
    assert [h["step"] for h in hook_a.history] == [2, 4, 6]
    assert [h["step"] for h in hook_b.history] == [3, 6]
    assert hook_a.history[0]["results"] == {"a": {"step": 2.0}}


def test_emas_get_their_own_state_back_when_attached_in_reverse_order(tmp_path):
    engine = make_engine(tmp_path, max_steps=4)
    fast = EMA(decay=0.5).attach(engine, name="ema_fast")
    slow = EMA(decay=0.99).attach(engine, name="ema_slow")
    PeriodicCheckpointer(period=4).attach(engine)
    engine.run()
    assert not torch.equal(fast.shadow["weight"], slow.shadow["weight"])

    resumed = make_engine(tmp_path, max_steps=4)
    slow2 = EMA(decay=0.99).attach(resumed, name="ema_slow")
    fast2 = EMA(decay=0.5).attach(resumed, name="ema_fast")
    assert resumed.resume()
    assert torch.equal(fast2.shadow["weight"], fast.shadow["weight"])
    assert torch.equal(slow2.shadow["weight"], slow.shadow["weight"])


def test_two_stateful_hooks_under_one_name_are_refused_at_attach(tmp_path):
    engine = make_engine(tmp_path, max_steps=2)
    EvalHook(scores_of("a"), period=1).attach(engine)
    with pytest.raises(ValueError, match="two hooks named 'EvalHook'.*pass a distinct name="):
        EvalHook(scores_of("b"), period=1).attach(engine)
    EMA(0.9).attach(engine)
    with pytest.raises(ValueError, match="two hooks named 'EMA'"):
        EMA(0.5).attach(engine)
    assert list(engine.events.stateful()) == ["EvalHook", "EMA"]


def test_state_of_a_hook_no_longer_attached_is_reported(tmp_path, caplog):
    engine = make_engine(tmp_path, max_steps=2)
    EvalHook(scores_of("a"), period=2).attach(engine, name="eval_a")
    EvalHook(scores_of("b"), period=2).attach(engine, name="eval_b")
    PeriodicCheckpointer(period=2).attach(engine)
    engine.run()

    resumed = make_engine(tmp_path, max_steps=2)
    hook_a = EvalHook(scores_of("a"), period=2).attach(resumed, name="eval_a")
    resumed.resume()
    resumed.run()
    assert hook_a.last_step == 2
    assert "checkpoint holds state for hook 'eval_b', which is not subscribed" in caplog.text


class StatefulSeedHook(HookBase):
    def __init__(self):
        self.steps = 0

    def after_step(self):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_register_hooks_keys_seed_hook_states_by_name(tmp_path):
    engine = make_engine(tmp_path, max_steps=4)
    first, second = StatefulSeedHook(), StatefulSeedHook()
    second.steps = 100
    register_hooks(engine, [first, second], names=["first", "second"])
    register_hooks(engine, [XmodalerStyleHook(), XmodalerStyleHook()])  # stateless: no names
    PeriodicCheckpointer(period=4).attach(engine)
    engine.run()
    assert list(engine.events.stateful()) == ["first", "second"]

    resumed = make_engine(tmp_path, max_steps=4)
    second2, first2 = StatefulSeedHook(), StatefulSeedHook()
    register_hooks(resumed, [second2, first2], names=["second", "first"])
    assert resumed.resume()
    assert (first2.steps, second2.steps) == (4, 104)


def test_register_hooks_refuses_two_stateful_hooks_of_one_class_without_names(tmp_path):
    engine = make_engine(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"two hooks named 'StatefulSeedHook'.*names="):
        register_hooks(engine, [StatefulSeedHook(), StatefulSeedHook()])


def test_writer_attached_first_still_logs_what_later_hooks_measured(tmp_path):
    engine = make_engine(
        tmp_path,
        max_steps=4,
        scheduler=None,
        optimizer_fn=lambda params: torch.optim.SGD(params, lr=0.05),
    )
    logged = []
    engine.accelerator.log = lambda values, step: logged.append((step, dict(values)))
    PeriodicWriter(2).attach(engine)  # before the hooks whose scalars it writes
    IterationTimer(0).attach(engine)
    LRScheduler().attach(engine)
    engine.on(Event.STEP_END, lambda e: e.scalars.__setitem__("seen_step", e.step))
    engine.run()
    assert [step for step, _ in logged] == [2, 4]
    for step, values in logged:
        assert values["seen_step"] == step and values["lr"] == 0.05 and values["time"] > 0
    assert logged[-1][1]["time"] == engine.step_time  # the step just finished, not the one before
