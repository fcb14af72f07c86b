"""Evaluation never changes training: the same run with evaluation every few steps, with
evaluation off, and killed and resumed right after an evaluation step end bitwise equal."""

import signal
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO, assert_bitwise_equal, load_final_state, subprocess_env
from test_recipes import TINY

# TINY keeps dropout on, so the RNG stream matters; evaluation and checkpoints coincide at step 3.
COMMON = [*TINY, "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=5"]


def xe(out, cache, *extra, kill_at=None):
    cmd = [sys.executable, str(FIXTURES / "recipe_kill.py"), str(REPO / "recipes/xe.py")]
    cmd += ["--config", str(REPO / "recipes/synthetic.yaml"), *COMMON]
    cmd += [f"data.cache_dir={cache}", f"output_dir={out}", *extra]
    env = subprocess_env(**({"KILL_AT": str(kill_at)} if kill_at else {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    expected = (-signal.SIGKILL, 128 + signal.SIGKILL) if kill_at else (0,)
    assert proc.returncode in expected, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_isolation")
    xe(root / "evaluated", root / "cache", "eval.every=3")
    return root


def test_a_run_with_evaluation_equals_the_run_without(evaluated):
    xe(evaluated / "quiet", evaluated / "cache", "eval.every=0")
    assert (evaluated / "evaluated/eval/val_step3.json").is_file()
    assert not (evaluated / "quiet/eval/val_step3.json").exists()
    assert_bitwise_equal(
        load_final_state(evaluated / "quiet/checkpoints/step_6"),
        load_final_state(evaluated / "evaluated/checkpoints/step_6"),
    )


def test_kill_right_after_an_evaluation_step_resumes_exactly(evaluated):
    out = evaluated / "killed"
    xe(out, evaluated / "cache", "eval.every=3", kill_at=4)
    xe(out, evaluated / "cache", "eval.every=3", "--resume")
    assert_bitwise_equal(
        load_final_state(out / "checkpoints/step_6"),
        load_final_state(evaluated / "evaluated/checkpoints/step_6"),
    )
