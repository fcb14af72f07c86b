"""The VCR recipe end to end: exact resume of both loaders after SIGKILL, two-process evaluation."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import BIN, FIXTURES, REPO, assert_bitwise_equal, load_final_state, subprocess_env
from xmodaler_accel.checkpoint import latest_checkpoint
from xmodaler_accel.data import synthetic_dir

# 30 items: Q->A batches of 8 (3 steps per epoch, 24 items), QA->R batches of 6 (5 per epoch),
# so the two loaders' epochs end at different steps.
SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 30, "num_val": 13, "num_test": 0}
CONFIG = REPO / "recipes" / "synthetic_vcr.yaml"
RECIPE = REPO / "recipes" / "vcr.py"
TINY = [
    "train.batch_size=8",
    "vcr.qar_batch_size=6",
    "train.max_steps=8",
    "train.log_every=2",
    "eval.every=0",
    "eval.batch_size=8",
    "checkpoint.every=2",
    "checkpoint.keep=5",
    "lr_scheduler.warmup_steps=2",
    "model.single_stream.hidden=32",
    "model.single_stream.layers=1",
    "model.single_stream.heads=2",
    "model.single_stream.intermediate=64",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcr_cache")
    return root, synthetic_dir(root, **SYNTHETIC)


def run_recipe(cache_dir, output_dir, *overrides, resume=False, kill_at=None, eval_only=False):
    data = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items()]
    cmd = [sys.executable, str(FIXTURES / "recipe_kill.py"), str(RECIPE), "--config", str(CONFIG)]
    cmd += ["--resume"] if resume else []
    cmd += ["--eval-only"] if eval_only else []
    cmd += [f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *data, *TINY, *overrides]
    env = subprocess_env(**({"KILL_AT": str(kill_at)} if kill_at else {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    expected = (-signal.SIGKILL, 128 + signal.SIGKILL) if kill_at else (0,)
    assert proc.returncode in expected, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def loader_states(checkpoint):
    trainer = json.loads((checkpoint / "trainer_state.json").read_text())
    hooks = torch.load(checkpoint / "hooks.pt", weights_only=True)
    return (trainer["epoch"], trainer["samples_in_epoch"]), hooks["qar_loader"]


def test_both_loaders_positions_survive_a_kill_and_resume_exactly(cache, tmp_path):
    cache_dir, _ = cache
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_recipe(cache_dir, whole)
    run_recipe(cache_dir, broken, kill_at=5)
    newest = latest_checkpoint(broken / "checkpoints")
    assert newest.name == "step_4"
    qa_position, qar_state = loader_states(newest)
    assert qa_position == (1, 8)  # Q->A: epoch 0 ended after 3 steps, 1 step into epoch 1
    assert (qar_state["epoch"], qar_state["samples_in_epoch"]) == (0, 24)  # QA->R: 4 of 5
    assert loader_states(whole / "checkpoints/step_4") == (qa_position, qar_state)
    run_recipe(cache_dir, broken, resume=True)
    final = load_final_state(broken / "checkpoints/step_8")
    assert_bitwise_equal(final, load_final_state(whole / "checkpoints/step_8"))
    _, qar_end = loader_states(broken / "checkpoints/step_8")
    assert (qar_end["epoch"], qar_end["samples_in_epoch"]) == (1, 18)  # 8 batches of 6 = 5 + 3

    # The output contract, from the uninterrupted run.
    result = json.loads((whole / "eval/val_step8.json").read_text())
    assert result["split"] == "val" and set(result["metrics"]) == {"Q->A", "QA->R", "Q->AR"}
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any({"qa_loss", "qar_loss", "qa_acc", "qar_acc"} <= row.keys() for row in rows)
    again = json.loads((broken / "eval/val_step8.json").read_text())
    assert again["metrics"] == result["metrics"]
    weights = f"model.weights={whole / 'checkpoints/step_8'}"
    run_recipe(cache_dir, tmp_path / "eval", weights, eval_only=True)
    assert (
        json.loads((tmp_path / "eval/eval/val_step0.json").read_text())["metrics"]
        == (result["metrics"])
    )


def run_dist_eval(data_dir, out, nproc):
    script = str(FIXTURES / "vcr_dist_eval.py")
    cmd = [sys.executable, script, str(data_dir), str(out)]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]
        cmd += [str(data_dir), str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_process_evaluation_equals_one_process(cache, tmp_path):
    _, data_dir = cache
    one = run_dist_eval(data_dir, tmp_path / "one.json", 1)
    two = run_dist_eval(data_dir, tmp_path / "two.json", 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["answers"]) == len(one["rationales"]) == SYNTHETIC["num_val"]
    assert two["answers"] == one["answers"] and two["rationales"] == one["rationales"]
    assert two["metrics"] == one["metrics"]
    assert set(one["metrics"]["val"]) == {"Q->A", "QA->R", "Q->AR"}
