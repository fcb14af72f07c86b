"""Hook lists written as X-modaler's `DefaultTrainer.build_hooks` writes them, on our Engine."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_engine, mse_step, regression_data
from xmodaler_accel import Event, hooks
from xmodaler_accel.hooks import (
    HookBase,
    PeriodicCheckpointer,
    PreciseBN,
    get_event_storage,
    register_hooks,
    trainer_view,
)

ITERS_PER_EPOCH = 4  # 64 samples in batches of 16


class TinyModel(torch.nn.Module):
    """Linear -> BatchNorm -> Linear, with X-modaler's `bind_or_init_weights`."""

    def __init__(self):
        super().__init__()
        self.encoder, self.bn, self.head = (
            torch.nn.Linear(8, 4),
            torch.nn.BatchNorm1d(4),
            torch.nn.Linear(4, 1),
        )
        self.bind_calls = 0

    def forward(self, x):
        return self.head(self.bn(self.encoder(x)))

    def bind_or_init_weights(self):
        self.bind_calls += 1


class FakeCheckpointer:
    """X-modaler's (fvcore's) Checkpointer interface: save(name, **extra), get_checkpoint_file()."""

    def __init__(self, save_dir: Path):
        self.save_dir, self.saved = save_dir, []
        save_dir.mkdir(parents=True, exist_ok=True)

    def save(self, name, **extra):
        path = self.save_dir / f"{name}.pth"
        path.write_text(json.dumps(extra))
        self.saved.append((name, extra))
        self.last = path

    def get_checkpoint_file(self):
        return str(self.last)


class RecordingWriter:
    """An X-modaler EventWriter: reads the storage of the run through get_event_storage()."""

    def __init__(self):
        self.writes, self.closed = [], False

    def write(self):
        storage = get_event_storage()
        self.writes.append((storage.iter, sorted(storage.latest())))

    def close(self):
        self.closed = True


class XmodalerScheduledSampling(HookBase):
    """X-modaler's ScheduledSampling hook, copied unchanged (the reference for ours)."""

    def __init__(self, start_iter, inc_every_iter, inc_prob, max_prob):
        self._start_iter = start_iter
        self._inc_every_iter = inc_every_iter
        self._inc_prob = inc_prob
        self._max_prob = max_prob

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter > self._start_iter:
            frac = (next_iter - self._start_iter) // self._inc_every_iter
            ss_prob = min(self._inc_prob * frac, self._max_prob)
            self.trainer.ss_prob = ss_prob


CFG = {
    "SOLVER": {"CHECKPOINT_PERIOD": 1, "EVAL_PERIOD": 1, "WRITE_PERIOD": 2},
    "INFERENCE": {"VAL_EVAL_START": 0, "TEST_EVAL_START": 1},
    "TEST": {"PRECISE_BN": {"NUM_ITER": 4}},
}


def precise_bn_batches():
    x = regression_data(64).tensors[0]
    return [x[i : i + 16] for i in range(0, 64, 16)]


def build_hooks(trainer, checkpointer, writers, evaluated, scheduler):
    """X-modaler's DefaultTrainer.build_hooks (plus PreciseBN, AutogradProfiler), as written
    there: `self` is the trainer, `hooks` the module of hook classes."""
    self, cfg, is_main_process = trainer, trainer.cfg, True

    def test_and_save_results(epoch):
        evaluated.append(("test", epoch))
        return {"CIDEr": 1.0 + epoch}

    def val_and_save_results(epoch):
        evaluated.append(("val", epoch))
        return {"CIDEr": float(epoch), "Bleu": {"4": 0.5}}

    def val_ema_and_save_results(epoch):
        evaluated.append(("val_ema", epoch))
        return {"CIDEr": 10.0 * epoch}

    ret = [
        hooks.IterationTimer(),
        hooks.LRScheduler(optimizer=self.optimizer, scheduler=scheduler),
        hooks.ScheduledSampling(
            start_iter=1 * self.iters_per_epoch,
            inc_every_iter=1 * self.iters_per_epoch,
            inc_prob=0.1,
            max_prob=0.15,
        ),
        hooks.ModelWeightsManipulating(),
        hooks.PreciseBN(
            cfg["SOLVER"]["EVAL_PERIOD"] * self.iters_per_epoch,
            self.model,
            precise_bn_batches(),
            cfg["TEST"]["PRECISE_BN"]["NUM_ITER"],
        ),
        hooks.AutogradProfiler(
            lambda trainer: trainer.iter > 5, Path(self.output_dir) / "profiler", use_cuda=False
        ),
    ]
    if is_main_process:
        ret.append(
            hooks.PeriodicCheckpointer(
                checkpointer, cfg["SOLVER"]["CHECKPOINT_PERIOD"] * self.iters_per_epoch
            )
        )
    else:
        ret.append(None)
    for stage, functions in (
        ("val", [val_and_save_results, val_ema_and_save_results]),
        ("test", [test_and_save_results]),
    ):
        for function in functions:
            ret.append(
                hooks.EvalHook(
                    eval_period=cfg["SOLVER"]["EVAL_PERIOD"],
                    eval_start=cfg["INFERENCE"][f"{stage.upper()}_EVAL_START"],
                    eval_function=function,
                    iters_per_epoch=self.iters_per_epoch,
                    stage=stage,
                    multi_gpu_eval=False,
                )
            )
    ret.append(hooks.PeriodicWriter(writers, period=cfg["SOLVER"]["WRITE_PERIOD"]))
    return ret


def test_xmodaler_build_hooks_list_runs_through_register_hooks(tmp_path):
    model = TinyModel()
    engine = make_engine(tmp_path, model=model, batch_size=16, max_steps=8, config=CFG)
    trainer = trainer_view(engine)
    assert trainer.iters_per_epoch == ITERS_PER_EPOCH and trainer.cfg is CFG
    scheduler = torch.optim.lr_scheduler.StepLR(engine.optimizer, step_size=2, gamma=0.5)
    checkpointer, writer, evaluated = FakeCheckpointer(tmp_path / "xm"), RecordingWriter(), []
    hook_list = build_hooks(trainer, checkpointer, [writer], evaluated, scheduler)
    register_hooks(engine, hook_list)
    engine.run()

    # IterationTimer: a time per step in the storage.
    assert len(trainer.storage.history("time").values()) == 8
    # LRScheduler: the scheduler given to it is stepped once per step, the rate logged.
    assert engine.scheduler is scheduler
    lrs = trainer.storage.history("lr").values()
    assert lrs == [(pytest.approx(0.05 * 0.5 ** (s // 2)), s - 1) for s in range(1, 9)]
    # ScheduledSampling: on the trainer (X-modaler's models read it there) and on the model.
    assert engine.ss_prob == model.ss_prob == pytest.approx(0.1)
    # ModelWeightsManipulating: bind_or_init_weights once, as training starts.
    assert model.bind_calls == 1
    # PreciseBN: exact statistics of the final weights over its batches.
    with torch.no_grad():
        hidden = model.encoder(torch.cat(precise_bn_batches()))
    torch.testing.assert_close(model.bn.running_mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    # AutogradProfiler: the steps whose iter > 5.
    assert sorted(p.name for p in (tmp_path / "profiler").iterdir()) == [
        "step7_rank0.json",
        "step8_rank0.json",
    ]
    # PeriodicCheckpointer: after each epoch (iterations 3 and 7), then model_final.
    assert checkpointer.saved == [
        ("model_Epoch_00001_Iter_0000003", {"iteration": 3}),
        ("model_Epoch_00002_Iter_0000007", {"iteration": 7}),
        ("model_final", {"iteration": 7}),
    ]
    # EvalHook: every epoch after eval_start, once at the end (not twice at step 8).
    assert evaluated == [("val", 1), ("val_ema", 1), ("val", 2), ("val_ema", 2), ("test", 2)]
    eval_files = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert eval_files == [
        "test_step8.json",
        "val#2_step4.json",
        "val#2_step8.json",
        "val_step4.json",
        "val_step8.json",
    ]
    result = json.loads((tmp_path / "eval" / "val_step8.json").read_text())
    assert result["metrics"] == {"CIDEr": 2.0, "Bleu/4": 0.5}
    assert trainer.storage.history("val#2/CIDEr").values() == [(10.0, 3), (20.0, 7)]
    # PeriodicWriter: every 2 steps (iterations 1, 3, 5, 7), with the step's loss; closed.
    assert [it for it, _ in writer.writes] == [1, 3, 5, 7]
    assert {"loss", "lr", "time", "data_time"} <= set(writer.writes[-1][1])
    assert writer.closed
    # The hooks' states are keyed by names that do not clash.
    assert sorted(engine.events.stateful()) == [
        "EvalHook.test.test_and_save_results",
        "EvalHook.val.val_and_save_results",
        "EvalHook.val.val_ema_and_save_results",
    ]


class IterationRecorder(HookBase):
    """Written as X-modaler's hooks are."""

    def __init__(self):
        self.calls = []

    def before_train(self):
        t = self.trainer
        self.calls.append(("before_train", t.iter, t.start_iter, t.max_iter))

    def before_step(self):
        self.calls.append(("before_step", self.trainer.iter, self.trainer.storage.iter))

    def after_step(self):
        lr = self.trainer.storage.history("lr").latest()
        self.calls.append(("after_step", self.trainer.iter, self.trainer.storage.iter, lr))

    def after_train(self):
        self.calls.append(("after_train", self.trainer.iter))


def test_hookbase_hook_sees_xmodaler_iterations_after_a_resume(tmp_path):
    engine = make_engine(tmp_path, max_steps=3)
    register_hooks(engine, [hooks.LRScheduler(), PeriodicCheckpointer(period=3)])
    engine.run()

    resumed = make_engine(tmp_path, max_steps=5)
    recorder = IterationRecorder()
    register_hooks(resumed, [hooks.LRScheduler(), recorder])
    assert resumed.resume()
    resumed.run()
    assert recorder.calls == [
        ("before_train", 3, 3, 5),
        ("before_step", 3, 3),
        ("after_step", 3, 3, 0.05),
        ("before_step", 4, 4),
        ("after_step", 4, 4, 0.05),
        ("after_train", 5),  # X-modaler: iter == max_iter after a finished training
    ]


def test_after_train_runs_when_a_step_raises(tmp_path):
    def failing_step(engine, batch):
        if engine.step == 2:
            raise RuntimeError("boom")
        return mse_step(engine, batch)

    engine = make_engine(tmp_path, max_steps=5, step_fn=failing_step)
    recorder, writer, evaluated = IterationRecorder(), RecordingWriter(), []

    def evaluate(epoch):
        evaluated.append(epoch)
        return {"score": 1.0}

    register_hooks(
        engine,
        [
            hooks.LRScheduler(),
            recorder,
            hooks.EvalHook(
                eval_period=0,
                eval_start=0,
                eval_function=evaluate,
                iters_per_epoch=8,
                stage="val",
                multi_gpu_eval=True,
            ),
            hooks.PeriodicWriter([writer], period=10),
        ],
    )
    with pytest.raises(RuntimeError, match="boom"):
        engine.run()
    assert recorder.calls[-2:] == [("before_step", 2, 2), ("after_train", 2)]
    assert writer.closed and evaluated == []  # no evaluation after a failed training


def test_register_hooks_skips_none_entries(tmp_path):
    engine = make_engine(tmp_path, max_steps=2)
    recorder = IterationRecorder()
    register_hooks(engine, [None, hooks.LRScheduler(), None, recorder, None])
    engine.run()
    assert [c[0] for c in recorder.calls].count("after_step") == 2


def test_precise_bn_leaves_frozen_batch_norm_untouched(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.Linear(4, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.Linear(4, 1),
    )
    model[1].eval().requires_grad_(False)  # frozen by the user
    frozen = {k: v.clone() for k, v in model[1].named_buffers()}
    batches = precise_bn_batches()
    engine = make_engine(tmp_path, model=model, max_steps=2)
    PreciseBN(period=0, data_loader=batches, num_iter=4).attach(engine)
    engine.run()
    for key, value in model[1].named_buffers():  # running_mean, running_var, num_batches
        assert torch.equal(value, frozen[key]), key
    with torch.no_grad():
        hidden = model[2](model[1](model[0](torch.cat(batches))))
    torch.testing.assert_close(model[3].running_mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    assert model[3].num_batches_tracked == 4


def test_constructors_take_xmodaler_positional_arguments(tmp_path):
    checkpointer = FakeCheckpointer(tmp_path)
    periodic = PeriodicCheckpointer(checkpointer, 2, 6, 1, "m")
    for iteration in range(6):
        periodic.step(iteration)
    assert [name for name, _ in checkpointer.saved] == ["m_0000001", "m_0000003", "m_0000005"] + [
        "m_final"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_0000005.pth", "m_final.pth"]
    periodic.save("extra", note="x")
    assert checkpointer.saved[-1] == ("extra", {"note": "x"})

    model = TinyModel()
    assert PreciseBN(3, model, [], 5).model is model
    evaluate = hooks.EvalHook(2, 1, lambda epoch: {}, 10, "test", True)
    assert (evaluate.period, evaluate.start, evaluate.split) == (20, 19, "test")
    assert hooks.IterationTimer(warmup_iter=2).warmup == 2
    assert hooks.PeriodicWriter([RecordingWriter(), "tensorboard"], 7).period == 7
    with pytest.raises(TypeError, match="X-modaler's: PeriodicCheckpointer"):
        PeriodicCheckpointer(checkpointer)


def _ss_probabilities(tmp_path, hook, read, max_steps=12, resume_at=None):
    """The scheduled-sampling probability each step of a run uses (2 steps per epoch)."""
    seen = []

    def build(steps):
        engine = make_engine(tmp_path, batch_size=32, max_steps=steps)
        register_hooks(engine, [hook, PeriodicCheckpointer(period=resume_at or max_steps)])
        engine.on(Event.STEP_START, lambda e: seen.append(read(e)))
        return engine

    if resume_at:
        build(resume_at).run()
        engine = build(max_steps)
        assert engine.resume()
    else:
        engine = build(max_steps)
    engine.run()
    return seen


def test_scheduled_sampling_equals_xmodalers_hook_step_by_step(tmp_path):
    args = dict(start_iter=2, inc_every_iter=4, inc_prob=0.05, max_prob=0.1)
    theirs = _ss_probabilities(
        tmp_path / "x", XmodalerScheduledSampling(**args), lambda e: getattr(e, "ss_prob", 0.0)
    )
    ours = _ss_probabilities(
        tmp_path / "o", hooks.ScheduledSampling(**args), lambda e: e.unwrapped_model.ss_prob
    )
    assert theirs == ours == [0.0] * 6 + [0.05] * 4 + [0.1] * 2
    # Resumed after 7 steps, the 8th step has the probability an uninterrupted run gives it
    # (X-modaler's own trainer would use 0.0 until that step ends).
    resumed = _ss_probabilities(
        tmp_path / "r", hooks.ScheduledSampling(**args), lambda e: e.unwrapped_model.ss_prob,
        resume_at=7,
    )  # fmt: skip
    assert resumed == ours
