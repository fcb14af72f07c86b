"""recipes/pretrain.py end to end: output contract, exact resume, fine-tuning recipes load it."""

import json
import signal
import subprocess
import sys

import pytest

from conftest import REPO, assert_bitwise_equal, load_final_state, subprocess_env
from xmodaler_accel.checkpoint import latest_checkpoint
from xmodaler_accel.data import synthetic_dir

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 8, "num_test": 0}
RECIPES = REPO / "recipes"
SINGLE = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}
CAPTIONER = {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}
CAPTIONER["ffn_dim"] = 64
SIZES = [f"model.single_stream.{k}={v}" for k, v in SINGLE.items()]
SIZES += [f"model.transformer.{k}={v}" for k, v in CAPTIONER.items()]
# 200 pairs, 8 per step: 25 steps per epoch; checkpoints every 4 steps, 32 steps in all.
SMALL = [
    "train.batch_size=8",
    "train.max_steps=32",
    "train.log_every=4",
    "eval.every=16",
    "eval.batch_size=16",
    "checkpoint.every=4",
    "checkpoint.keep=2",
    "pretrain.eval_pairs=24",
    *SIZES,
]
METRICS = {"mlm_acc", "caption_acc", "mrm_acc", "itm_acc", "mlm_acc_s2", "caption_acc_s2"}
METRICS.add("mrm_acc_s2")

KILLABLE = REPO / "tests" / "fixtures" / "recipe_kill.py"  # KILL_AT=N: SIGKILL after step N


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "pretrain_cache"
    synthetic_dir(root, **SYNTHETIC)
    return root


def run(script, config, cache, output_dir, *overrides, env=None, pre=()):
    data = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items()]
    cmd = [sys.executable, str(script), *pre, "--config", str(config)]
    cmd += [f"output_dir={output_dir}", f"data.cache_dir={cache}", *data, *overrides]
    return subprocess.run(
        cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=300
    )


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pretrained(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    config = RECIPES / "synthetic_pretrain.yaml"
    ok(run(RECIPES / "pretrain.py", config, cache_dir, out, *SMALL))
    return out


def test_pretraining_writes_metrics_checkpoints_and_fine_tuning_weights(pretrained):
    for name in (
        "config.yaml",
        "log.txt",
        "metrics.jsonl",
        "checkpoints/step_32/model.safetensors",
    ):
        assert (pretrained / name).is_file(), name
    for target in ("retrieval", "vcr", "encoder", "captioner"):
        assert (pretrained / "export" / f"{target}.safetensors").is_file(), target
    result = json.loads((pretrained / "eval/val_step32.json").read_text())
    assert set(result["metrics"]) == METRICS
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"loss", "loss_s1", "loss_s2", "loss_mlm", "loss_itm", "mlm_acc", "itm_acc"} <= logged


def test_resume_after_kill_in_second_epoch_is_bitwise_exact(pretrained, cache_dir, tmp_path):
    script, config = KILLABLE, RECIPES / "synthetic_pretrain.yaml"
    pre = [str(RECIPES / "pretrain.py")]
    proc = run(script, config, cache_dir, tmp_path, *SMALL, env={"KILL_AT": "30"}, pre=pre)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_28"
    state = json.loads((tmp_path / "checkpoints/step_28/trainer_state.json").read_text())
    assert (state["epoch"], state["samples_in_epoch"]) == (1, 24)
    ok(run(script, config, cache_dir, tmp_path, *SMALL, pre=[*pre, "--resume"]))
    assert_bitwise_equal(
        load_final_state(tmp_path / "checkpoints/step_32"),
        load_final_state(pretrained / "checkpoints/step_32"),
    )


def test_retrieval_and_captioning_recipes_load_the_exported_weights(
    pretrained, cache_dir, tmp_path
):
    single = [f"model.single_stream.{k}={v}" for k, v in SINGLE.items()]
    weights = pretrained / "export" / "retrieval.safetensors"
    ok(run(
        RECIPES / "retrieval.py", RECIPES / "synthetic_retrieval.yaml", cache_dir,
        tmp_path / "retrieval", "model.kind=single_stream", f"model.weights={weights}",
        "eval.batch_size=64", *single, pre=["--eval-only"],
    ))  # fmt: skip
    assert (tmp_path / "retrieval/eval/val_step0.json").is_file()
    captioner = [f"model.transformer.{k}={v}" for k, v in CAPTIONER.items()]
    weights = pretrained / "export" / "captioner.safetensors"
    ok(run(
        RECIPES / "xe.py", RECIPES / "synthetic.yaml", cache_dir, tmp_path / "xe",
        f"model.weights={weights}", "eval.splits=[val]", *captioner, pre=["--eval-only"],
    ))  # fmt: skip
    assert (tmp_path / "xe/eval/val_step0.json").is_file()


def test_a_pretraining_checkpoint_as_fine_tuning_weights_names_the_export_file(
    pretrained, cache_dir, tmp_path
):
    """What an X-modaler user does (pass the pretraining checkpoint) is answered in one line."""
    single = [f"model.single_stream.{k}={v}" for k, v in SINGLE.items()]
    checkpoint = pretrained / "checkpoints" / "step_32"
    proc = run(
        RECIPES / "retrieval.py", RECIPES / "synthetic_retrieval.yaml", cache_dir,
        tmp_path / "retrieval", "model.kind=single_stream", f"model.weights={checkpoint}",
        *single, pre=["--eval-only"],
    )  # fmt: skip
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert "a pretraining run's whole model" in error
    assert f"model.weights={pretrained / 'export'}/<retrieval|vcr|encoder|captioner>" in error
    assert "unexpected keys" not in error


def exported(directory):
    from safetensors.torch import load_file

    return {path.name: load_file(path) for path in sorted(directory.glob("*.safetensors"))}


def test_eval_only_re_exports_trained_weights_and_never_random_ones(
    pretrained, cache_dir, tmp_path
):
    import shutil

    import torch

    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    trained = exported(pretrained / "export")
    config = RECIPES / "synthetic_pretrain.yaml"
    refused = run(RECIPES / "pretrain.py", config, cache_dir, out, *SMALL, pre=["--eval-only"])
    assert refused.returncode != 0 and "--eval-only needs weights" in refused.stderr
    assert not (out / "eval/val_step0.json").exists()  # random weights: neither scored nor exported

    def same(a, b):
        return a.keys() == b.keys() and all(
            torch.equal(a[name][k], b[name][k]) for name in a for k in a[name]
        )

    assert same(exported(out / "export"), trained)
    shutil.rmtree(out / "export")
    ok(
        run(
            RECIPES / "pretrain.py", config, cache_dir, out, *SMALL, pre=["--eval-only", "--resume"]
        )
    )
    assert same(exported(out / "export"), trained)
    assert json.loads((out / "eval/val_step32.json").read_text()) == json.loads(
        (pretrained / "eval/val_step32.json").read_text()
    )
