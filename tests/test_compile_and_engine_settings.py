"""Scale-out beyond the captioning loop: torch.compile's checkpoints, the pretraining export under
FSDP, machines that do not share output_dir, and what an engine cannot do (refused at start,
naming the key and the engine)."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import REPO, subprocess_env
from scale_out_helpers import FSDP, run, two_nodes, xe_command
from xmodaler_accel import load_weights, sharding
from xmodaler_accel.config import Config, ConfigError
from xmodaler_accel.data import dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.tasks.captioning import captioner_from_config, load_caption_config


def test_compiled_run_saves_plain_names_and_loads_uncompiled(tmp_path):
    out = tmp_path / "compiled"
    args = ("train.max_steps=2", "checkpoint.every=2", "eval.every=100", "train.ema_decay=0")
    log = run(xe_command(out, *args), env={"ACCELERATE_DYNAMO_BACKEND": "eager"})  # CPU backend
    assert "compile      eager" in log
    # The run's config builds the plain (uncompiled) captioner; its weights load strictly.
    cfg = load_caption_config(out / "config.yaml", [])
    data = open_dataset(cfg)
    model = captioner_from_config(cfg, load_tokenizer(dataset_dir(cfg)), data["train"])
    load_weights(model, out / "checkpoints" / "step_2", strict=True)
    saved = load_file(str(out / "checkpoints" / "step_2" / "model.safetensors"))
    assert not [k for k in saved if "_orig_mod" in k]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_machines_that_do_not_share_output_dir_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # a relative output_dir: one folder per "machine"
    a.mkdir(), b.mkdir()
    results = two_nodes(Path("run"), (a, b))
    assert all(code != 0 for code, _ in results)
    assert "output_dir run is not shared" in results[0][1]
    assert not (a / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- what an engine cannot do
def fake_accelerator(kind: DistributedType, **state) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, num_processes=2, state=SimpleNamespace(**state))


def settings(mode: str = "norm", max_norm: float = 1.0, ema: float = 0.0) -> Config:
    return Config({"train": {"clip_grad": {"mode": mode, "max": max_norm}, "ema_decay": ema}})


def test_clip_by_value_under_fsdp_is_refused_at_start(tmp_path):
    cmd = xe_command(tmp_path / "run", "train.clip_grad.mode=value", "--num-gpus", "2")
    proc = subprocess.run(cmd, env=subprocess_env(**FSDP), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config key 'train.clip_grad.mode' is 'value', which FSDP2 cannot do" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sharded_state_dict_type_is_refused():
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=plugin)
    with pytest.raises(ConfigError, match="fsdp_state_dict_type is SHARDED_STATE_DICT"):
        sharding.check_engine_settings(settings(), acc)


@pytest.mark.parametrize(
    ("cfg", "ds", "message"),
    [
        (settings("norm", 1.0), {"gradient_clipping": 0.5}, "gradient_clipping=0.5"),
        (settings("none"), {"gradient_clipping": 1.0}, "asks for no gradient-norm clipping"),
        (settings("value"), {}, "which DeepSpeed ZeRO-2 cannot do"),
        (settings(ema=0.99), {"gradient_clipping": 1.0, "stage": 3}, "train.ema_decay"),
        (settings(), {"gradient_clipping": 1.0, "stage": 3}, "zero3_save_16bit_model"),
    ],
)
def test_deepspeed_settings_it_cannot_honour_are_refused(cfg, ds, message):
    stage = ds.pop("stage", 2)
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={**ds, "zero_optimization": {}})
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    with pytest.raises(ConfigError, match=message):
        sharding.check_engine_settings(cfg, acc)


@pytest.mark.parametrize("clip", [1.0, "auto"])
def test_deepspeed_settings_that_agree_pass(clip):
    ds = {"gradient_clipping": clip, "zero_optimization": {}}
    plugin = SimpleNamespace(zero_stage=2, deepspeed_config=ds)
    sharding.check_engine_settings(
        settings("norm", 0.5 if clip == "auto" else 1.0),
        fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin),
    )
    assert ds["gradient_clipping"] == (0.5 if clip == "auto" else 1.0)  # "auto" takes ours


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1"),  # Accelerate's default version
    ],
)
def test_engines_that_need_gpus_are_refused_on_cpu(env, message):
    with pytest.raises(ConfigError, match=message):
        sharding.check_cpu_engine(env)
    sharding.check_cpu_engine({**env, "ACCELERATE_USE_DEEPSPEED": "false", "FSDP_VERSION": "2"})


def test_pretraining_export_under_fsdp_holds_the_whole_trained_weights(tmp_path):
    """The export runs from a plain copy of the gathered model: every tensor equals the one in
    the run's whole-model checkpoint (an FSDP module's own state_dict would give shards)."""
    out = tmp_path / "pretrain"
    cmd = [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--num-gpus", "2"]
    cmd += ["--config", str(REPO / "recipes" / "synthetic_pretrain.yaml"), f"output_dir={out}"]
    small = ["data.synthetic.num_train=200", "data.synthetic.num_val=20", "pretrain.eval_pairs=20"]
    run([*cmd, *small, "train.max_steps=2", "checkpoint.every=2", "eval.every=100"], env=FSDP)
    whole = load_file(str(out / "checkpoints" / "step_2" / "model.safetensors"))
    exported = load_file(str(out / "export" / "retrieval.safetensors"))
    assert exported and all(torch.equal(exported[k], whole[k]) for k in exported)
