"""Exact resume: SIGKILL mid-epoch, twice, SIGTERM, and a checkpoint write cut short."""

import json
import signal

import pytest

from conftest import assert_bitwise_equal, load_final_state, run_toy
from xmodaler_accel.checkpoint import latest_checkpoint, list_checkpoints

# 200 samples, batch 8, drop_last off: 25 steps per epoch; 60 steps cover 2.4 epochs.
STEPS_PER_EPOCH = 25


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def killed(proc, sig=signal.SIGKILL):
    assert proc.returncode in (-sig, 128 + sig), (proc.returncode, proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    ok(run_toy(out))
    return load_final_state(out / "checkpoints" / "step_60")


def test_resume_after_kill_mid_second_epoch_is_bitwise_exact(tmp_path, uninterrupted):
    kill_at = STEPS_PER_EPOCH + 12  # step 37, mid epoch 2; newest checkpoint is step 35
    killed(run_toy(tmp_path, env={"TOY_KILL_AT": str(kill_at)}))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_35"
    state = json.loads((tmp_path / "checkpoints/step_35/trainer_state.json").read_text())
    assert (state["epoch"], state["samples_in_epoch"]) == (1, 80)
    ok(run_toy(tmp_path, resume=True))
    assert_bitwise_equal(load_final_state(tmp_path / "checkpoints" / "step_60"), uninterrupted)


def test_resume_twice_is_bitwise_exact(tmp_path, uninterrupted):
    killed(run_toy(tmp_path, env={"TOY_KILL_AT": "37"}))
    killed(run_toy(tmp_path, resume=True, env={"TOY_KILL_AT": "53"}))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_50"
    ok(run_toy(tmp_path, resume=True))
    assert_bitwise_equal(load_final_state(tmp_path / "checkpoints" / "step_60"), uninterrupted)


def test_sigterm_finishes_step_saves_and_resumes_exactly(tmp_path, uninterrupted):
    proc = run_toy(tmp_path, env={"TOY_SIGTERM_AT": "42"})
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step 42" in proc.stdout + proc.stderr
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_42"
    ok(run_toy(tmp_path, resume=True))
    assert_bitwise_equal(load_final_state(tmp_path / "checkpoints" / "step_60"), uninterrupted)


def test_interrupted_checkpoint_write_keeps_last_good_one(tmp_path, uninterrupted):
    killed(run_toy(tmp_path, env={"TOY_KILL_IN_SAVE": "40"}))
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / ".tmp-step_40").is_dir()  # the partial write is left behind ...
    assert [s for s, _ in list_checkpoints(ckpts)] == [30, 35]  # ... but never taken as complete
    ok(run_toy(tmp_path, resume=True))
    assert not (ckpts / ".tmp-step_40").exists()
    assert_bitwise_equal(load_final_state(ckpts / "step_60"), uninterrupted)


def test_metrics_after_resume_continue_the_curve(tmp_path):
    ok(run_toy(tmp_path / "a"))
    killed(run_toy(tmp_path / "b", env={"TOY_KILL_AT": "37"}))
    ok(run_toy(tmp_path / "b", resume=True))

    def losses(path):
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (40, 45, 50, 55, 60):  # written after the resume from step 35
        assert a[step] == b[step]
