"""The retrieval recipe end to end, and retrieval under two processes (torchrun, gloo)."""

import json
import subprocess
import sys

import pytest

from conftest import BIN, FIXTURES, REPO, subprocess_env
from xmodaler_accel.data import synthetic_dir

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 60, "num_val": 13, "num_test": 0}
RECIPE = REPO / "recipes" / "retrieval.py"
CONFIG = REPO / "recipes" / "synthetic_retrieval.yaml"
METRICS = {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, synthetic_dir(root, **SYNTHETIC)


def run_recipe(cache_dir, output_dir, *overrides, eval_only=False):
    data = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items()]
    cmd = [sys.executable, str(RECIPE), "--config", str(CONFIG)]
    cmd += ["--eval-only"] if eval_only else []
    cmd += [f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *data, *overrides]
    return ok(
        subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    )


def test_reranking_without_a_two_stream_checkpoint_names_the_missing_key(cache, tmp_path):
    cache_dir, _ = cache
    data = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items()]
    cmd = [sys.executable, str(RECIPE), "--config", str(CONFIG), "--eval-only", "--resume"]
    cmd += [f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}", *data]
    cmd += ["model.kind=single_stream", "retrieval.rerank_k=4"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "set retrieval.rerank_weights" in proc.stderr


def test_single_stream_hard_negative_recipe_writes_the_output_contract(cache, tmp_path):
    cache_dir, _ = cache
    out = tmp_path / "run"
    small = [
        "model.kind=single_stream",
        "train.hard_negatives=true",
        "train.negative_pool=6",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.log_every=2",
        "eval.every=4",
        "eval.batch_size=512",
        "checkpoint.every=4",
        "model.single_stream.hidden=32",
        "model.single_stream.layers=1",
        "model.single_stream.intermediate=64",
    ]
    run_recipe(cache_dir, out, *small)
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoints/step_4/model.safetensors"):
        assert (out / name).is_file(), name
    trained = json.loads((out / "eval/val_step4.json").read_text())
    assert trained["split"] == "val" and set(trained["metrics"]) == METRICS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("itm_acc" in row for row in rows)
    assert (
        "single-stream full scoring on val (13 images x 65 captions)"
        in (out / "log.txt").read_text()
    )

    weights = f"model.weights={out / 'checkpoints/step_4'}"
    run_recipe(cache_dir, tmp_path / "eval", *small, weights, eval_only=True)
    again = json.loads((tmp_path / "eval/eval/val_step0.json").read_text())
    assert again["metrics"] == trained["metrics"]


def run_dist(data_dir, out, nproc):
    script = str(FIXTURES / "retrieval_dist.py")
    cmd = [sys.executable, script, str(data_dir), str(out)]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]
        cmd += [str(data_dir), str(out)]
    ok(subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300))
    return json.loads(out.read_text())


def test_two_process_retrieval_equals_one_process(cache, tmp_path):
    _, data_dir = cache
    one = run_dist(data_dir, tmp_path / "one.json", 1)
    two = run_dist(data_dir, tmp_path / "two.json", 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # Evaluation: every number identical (two-stream, full single-stream, re-ranking).
    assert two["eval"] == one["eval"]
    assert set(one["eval"]["rerank"]) == {"val", "val_two_stream"}
    # Negatives from the global batch: the same loss and the same gradients as one process.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, grad in one["grads"].items():
        assert two["grads"][name] == pytest.approx(grad, rel=1e-4, abs=1e-6), name
