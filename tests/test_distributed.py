"""Two processes on CPU (gloo through torchrun): curves, logging, resume and evaluation."""

import json
import subprocess
import sys

import pytest

from conftest import BIN, FIXTURES, assert_bitwise_equal, load_final_state, run_toy, subprocess_env


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_proc")
    proc = ok(run_toy(out, "train.batch_size=4", "model.dropout=0.0", nproc=2))
    return out, proc


def test_two_processes_really_run_two(two_process_run):
    out, _ = two_process_run
    log = (out / "log.txt").read_text()
    assert "processes    2 (DDP)" in log


def test_two_processes_match_one_process_with_same_global_batch(tmp_path, two_process_run):
    out2, _ = two_process_run
    ok(run_toy(tmp_path, "train.batch_size=8", "model.dropout=0.0"))
    one, two = losses(tmp_path), losses(out2)
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(5, 61, 5))
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_only_main_process_writes_logs(two_process_run):
    out, proc = two_process_run
    log = (out / "log.txt").read_text()
    assert log.count("resolved config written") == 1
    steps = [s for s, _ in losses(out)]
    assert steps == sorted(set(steps))  # one row per logged step, not one per process
    assert (proc.stdout + proc.stderr).count("step 60/60") == 1


def test_two_process_kill_and_resume_is_bitwise_exact(tmp_path, two_process_run):
    reference, _ = two_process_run
    proc = run_toy(
        tmp_path, "train.batch_size=4", "model.dropout=0.0", nproc=2, env={"TOY_KILL_AT": "37"}
    )
    assert proc.returncode != 0
    ok(run_toy(tmp_path, "train.batch_size=4", "model.dropout=0.0", nproc=2, resume=True))
    assert_bitwise_equal(
        load_final_state(tmp_path / "checkpoints/step_60"),
        load_final_state(reference / "checkpoints/step_60"),
    )


def test_two_process_resume_with_dropout_is_bitwise_exact(tmp_path):
    ok(run_toy(tmp_path / "a", "train.batch_size=4", nproc=2))
    proc = run_toy(tmp_path / "b", "train.batch_size=4", nproc=2, env={"TOY_KILL_AT": "33"})
    assert proc.returncode != 0
    ok(run_toy(tmp_path / "b", "train.batch_size=4", nproc=2, resume=True))
    assert_bitwise_equal(
        load_final_state(tmp_path / "b/checkpoints/step_60"),
        load_final_state(tmp_path / "a/checkpoints/step_60"),
    )


def run_eval(tmp_path, nproc):
    out = tmp_path / f"eval{nproc}.json"
    script = str(FIXTURES / "dist_eval.py")
    cmd = [sys.executable, script, str(out)]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script, str(out)]
    ok(subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300))
    return json.loads(out.read_text())


def test_distributed_evaluation_sees_every_sample_once(tmp_path):
    one, two = run_eval(tmp_path, 1), run_eval(tmp_path, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # 101 samples in batches of 8 over 2 processes: 7 batches each, the last ones padded.
    assert two["rows_seen_rank0"] == 56
    assert len(two["predictions"]) == 101
    assert two["predictions"] == one["predictions"]
