"""SCST through its recipe: exact resume, two processes agree with one, the reward rises."""

import json
import subprocess
import sys

import pytest

from conftest import BIN, REPO, assert_bitwise_equal, load_final_state, subprocess_env
from test_recipes import TINY

NO_DROPOUT = [
    "model.transformer.dropout=0.0",
    "model.transformer.visual_dropout=0.0",
    "model.transformer.pred_dropout=0.0",
]


def recipe(script, *args, cache, nproc=1):
    cmd = [sys.executable, str(REPO / script)]
    if nproc > 1:
        cmd = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(REPO / script),
        ]
    cmd += [
        "--config",
        str(REPO / "recipes/synthetic.yaml"),
        *TINY,
        f"data.cache_dir={cache}",
        *args,
    ]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out, key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def xe_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("scst")
    recipe(
        "recipes/xe.py",
        f"output_dir={root / 'xe'}",
        "train.max_steps=30",
        "eval.every=0",
        "checkpoint.every=30",
        *NO_DROPOUT,
        cache=root / "cache",
    )
    return root, root / "xe" / "checkpoints" / "step_30"


def test_scst_resume_is_bitwise_exact(xe_weights):
    root, weights = xe_weights
    common = [f"model.weights={weights}", "eval.every=0", "checkpoint.every=2"]
    recipe(
        "recipes/scst.py",
        *common,
        f"output_dir={root / 'a'}",
        "train.max_steps=4",
        cache=root / "cache",
    )
    recipe(
        "recipes/scst.py",
        *common,
        f"output_dir={root / 'b'}",
        "train.max_steps=2",
        cache=root / "cache",
    )
    recipe(
        "recipes/scst.py",
        *common,
        f"output_dir={root / 'b'}",
        "train.max_steps=4",
        "--resume",
        cache=root / "cache",
    )
    assert_bitwise_equal(
        load_final_state(root / "b/checkpoints/step_4"),
        load_final_state(root / "a/checkpoints/step_4"),
    )


def test_two_process_scst_agrees_with_one_process(xe_weights):
    root, weights = xe_weights
    common = [
        f"model.weights={weights}",
        "eval.every=0",
        "rl.sampler=beam",
        "rl.baseline=mean",
        "rl.samples_per_image=3",
        "train.max_steps=4",
        "train.log_every=1",
        *NO_DROPOUT,
    ]
    recipe(
        "recipes/scst.py",
        *common,
        f"output_dir={root / 'one'}",
        "train.batch_size=8",
        cache=root / "cache",
    )
    proc = recipe(
        "recipes/scst.py",
        *common,
        f"output_dir={root / 'two'}",
        "train.batch_size=4",
        cache=root / "cache",
        nproc=2,
    )
    assert "processes    2 (DDP)" in (root / "two" / "log.txt").read_text()
    for key in ("loss", "reward", "baseline"):
        one, two = losses(root / "one", key), losses(root / "two", key)
        assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(one, two):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
    assert proc.returncode == 0


def test_scst_raises_the_mean_reward(xe_weights):
    root, weights = xe_weights
    recipe(
        "recipes/scst.py",
        f"model.weights={weights}",
        f"output_dir={root / 'learn'}",
        "train.max_steps=60",
        "optim.lr=0.002",
        "eval.every=0",
        "train.log_every=10",
        "rl.baseline=leave_one_out",
        cache=root / "cache",
    )
    rewards = [r for _, r in losses(root / "learn", "reward")]
    assert len(rewards) == 6 and (rewards[-1] + rewards[-2]) / 2 > rewards[0] * 1.3, rewards
