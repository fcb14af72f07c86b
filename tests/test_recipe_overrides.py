"""Every recipe, run as a user runs it: a command-line override reaches the run, and the
`config.yaml` it writes is what ran (it resolves to itself when given back to the recipe)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, subprocess_env
from test_recipes import TINY as CAPTION_TINY
from xmodaler_accel import load_config
from xmodaler_accel.data import synthetic_dir
from xmodaler_accel.tasks.captioning import load_caption_config, load_scst_config
from xmodaler_accel.tasks.pretraining import PRETRAIN_DEFAULTS
from xmodaler_accel.tasks.retrieval import RETRIEVAL_DEFAULTS
from xmodaler_accel.tasks.vcr import VCR_DEFAULTS

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 8, "num_test": 8}
SINGLE = [
    "model.single_stream.hidden=32",
    "model.single_stream.layers=1",
    "model.single_stream.heads=2",
    "model.single_stream.intermediate=64",
]
CAPTION = [o for o in CAPTION_TINY if not o.startswith("data.synthetic.")]
TWO_STREAM = ["model.two_stream.hidden=32", "model.two_stream.embed_dim=32"]
PRETRAIN = [*SINGLE, "model.transformer.d_model=32", "model.transformer.num_heads=2"]
PRETRAIN += ["model.transformer.ffn_dim=64", "model.transformer.num_encoder_layers=1"]
PRETRAIN += ["model.transformer.num_decoder_layers=1", "pretrain.eval_pairs=8"]
# (recipe, config, tiny sizes, how the recipe resolves its config)
RECIPES = {
    "xe": ("synthetic.yaml", CAPTION, load_caption_config),
    "scst": ("synthetic.yaml", CAPTION, load_scst_config),
    "retrieval": ("synthetic_retrieval.yaml", TWO_STREAM, RETRIEVAL_DEFAULTS),
    "vcr": ("synthetic_vcr.yaml", [*SINGLE, "vcr.qar_batch_size=4"], VCR_DEFAULTS),
    "pretrain": ("synthetic_pretrain.yaml", PRETRAIN, PRETRAIN_DEFAULTS),
}
# Keys every recipe understands, set to values no shipped config uses.
OVERRIDES = [
    "train.max_steps=3",
    "train.batch_size=4",
    "train.log_every=1",
    "optim.lr=0.000123",
    "lr_scheduler.name=constant",
    "lr_scheduler.warmup_steps=0",
    "eval.every=0",
    "eval.batch_size=8",
    "checkpoint.every=2",
    "checkpoint.keep=5",
    "seed=7",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("override_cache")
    synthetic_dir(root, **SYNTHETIC)
    return root


def resolve(how, path, overrides=()):
    if callable(how):
        return how(path, overrides)
    return load_config(path, overrides, defaults=how)


@pytest.mark.parametrize("name", list(RECIPES))
def test_command_line_overrides_reach_the_run_and_config_yaml_is_what_ran(name, cache, tmp_path):
    config, sizes, how = RECIPES[name]
    out = tmp_path / "out"
    overrides = [*sizes, *(f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items())]
    overrides += [f"data.cache_dir={cache}", *OVERRIDES, f"output_dir={out}"]
    if name == "scst":  # its `scst:` section sets train.max_steps=300, optim.lr ...: we win
        overrides.append(f"model.weights={train_xe(cache, tmp_path)}")
    cmd = [sys.executable, str(REPO / "recipes" / f"{name}.py"), "--config"]
    cmd += [str(REPO / "recipes" / config), *overrides]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing went elsewhere
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    state = json.loads((out / "checkpoints/step_3/trainer_state.json").read_text())
    assert state["step"] == 3 and state["global_batch_size"] == 4 and state["sampler_seed"] == 7
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows if "loss" in r] == [(s, 0.000123) for s in (1, 2, 3)]

    ran = yaml.safe_load((out / "config.yaml").read_text())
    assert ran["train"]["max_steps"] == 3 and ran["output_dir"] == str(out)
    assert ran["optim"]["lr"] == 0.000123 and ran["seed"] == 7
    assert resolve(how, out / "config.yaml").to_dict() == ran


def train_xe(cache, tmp_path):
    """XE weights for SCST to start from (a short run of the XE recipe)."""
    out = tmp_path.parent / f"{tmp_path.name}_xe"
    cmd = [sys.executable, str(REPO / "recipes/xe.py"), "--config"]
    cmd += [str(REPO / "recipes/synthetic.yaml"), *CAPTION, f"data.cache_dir={cache}"]
    cmd += [*(f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items())]
    cmd += [f"output_dir={out}", "train.max_steps=2", "eval.every=0", "checkpoint.every=2"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints/step_2"


def test_scst_section_sits_between_the_yaml_and_the_command_line(tmp_path):
    path = REPO / "recipes/synthetic.yaml"
    weights = ["model.weights=xe.safetensors"]
    xe = load_caption_config(path)
    scst = load_scst_config(path, weights)
    assert (xe.train.max_steps, xe.optim.lr, xe.output_dir) == (1500, 0.0005, "output/synthetic_xe")
    assert (scst.train.max_steps, scst.optim.lr, scst.output_dir) == (
        300,
        0.00002,
        "output/synthetic_scst",
    )
    assert scst.lr_scheduler.name == "constant" and scst.model.weights == "xe.safetensors"
    assert scst.decode == xe.decode and scst.model.transformer == xe.model.transformer
    cli = load_scst_config(path, [*weights, "train.max_steps=3", "scst.optim.lr=0.1"])
    assert cli.train.max_steps == 3 and cli.optim.lr == 0.1 and cli.scst.optim.lr == 0.1
    both = load_scst_config(path, [*weights, "scst.optim.lr=0.1", "optim.lr=0.2"])
    assert both.optim.lr == 0.2  # the command line's plain key wins over its section's


def test_a_typo_in_the_scst_section_names_the_key(tmp_path):
    from xmodaler_accel.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {REPO / 'recipes/synthetic.yaml'}\nscst: {{train: {{max_step: 3}}}}\n")
    for load in (load_scst_config, load_caption_config):  # XE checks the section it ignores
        with pytest.raises(ConfigError, match="max_step"):
            load(bad, ["model.weights=x"])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        f"_base_: {REPO / 'recipes/synthetic.yaml'}\nscst: {{rl: {{baseline: best}}}}\n"
    )
    with pytest.raises(ConfigError, match="rl.baseline"):
        load_caption_config(wrong)


@pytest.mark.parametrize("name", ["xe", "retrieval", "vcr", "pretrain"])
def test_eval_only_without_weights_or_resume_is_refused(name, tmp_path):
    config, _, _ = RECIPES[name]
    cmd = [sys.executable, str(REPO / "recipes" / f"{name}.py"), "--config"]
    cmd += [str(REPO / "recipes" / config), "--eval-only", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode != 0 and "--eval-only needs weights to score" in proc.stderr
    assert not (tmp_path / "out").exists()
