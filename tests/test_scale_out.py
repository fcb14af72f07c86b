"""Accelerate's engines through the captioning recipe as a user launches it: FSDP2 on two CPU
processes (gloo), torch.compile, two "machines" on one host. DeepSpeed needs GPUs (Accelerate
selects it only for GPU backends): its checks are in benchmarks/scale_out_gpu.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import BIN, REPO, assert_bitwise_equal, load_final_state, subprocess_env
from xmodaler_accel import sharding
from xmodaler_accel.config import Config, ConfigError

XE = REPO / "recipes" / "xe.py"
SMALL = [
    "--config",
    str(REPO / "recipes" / "synthetic.yaml"),
    "data.synthetic.num_train=200",
    "data.synthetic.num_val=20",
    "data.synthetic.num_test=20",
    "eval.splits=[val]",
    "train.max_steps=6",
    "train.ema_decay=0.9",  # its shadow weights are sharded too, and must resume exactly
    "checkpoint.every=2",
    "checkpoint.keep=5",
    "eval.every=6",
]
FSDP = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}


def xe_command(output_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(XE), *SMALL, f"output_dir={output_dir}", *args]


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def captions(output_dir: Path, step: int) -> list:
    return json.loads((output_dir / "eval" / f"val_step{step}_captions.json").read_text())


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    log = run(xe_command(out, "--num-gpus", "2"), env=FSDP)
    assert "processes    2 (FSDP2)" in log
    return out


def test_fsdp_kill_and_resume_is_bitwise_exact(tmp_path, fsdp_run):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        xe_command(out, "--num-gpus", "2"),
        env=subprocess_env(**FSDP),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = out / "checkpoints" / "step_2" / "manifest.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-training
    proc.wait()
    assert not (out / "checkpoints" / "step_6").exists(), "killed too late to test a resume"

    log = run(xe_command(out, "--num-gpus", "2", "--resume"), env=FSDP)
    assert "resumed from" in log
    final, reference = out / "checkpoints" / "step_6", fsdp_run / "checkpoints" / "step_6"
    assert_bitwise_equal(load_final_state(final), load_final_state(reference))
    ema, ema_ref = (load_hooks(p)["EMA"] for p in (final, reference))
    assert ema["updates"] == ema_ref["updates"] == 6
    assert_bitwise_equal(ema["shadow"], ema_ref["shadow"])
    assert captions(out, 6) == captions(fsdp_run, 6)


def load_hooks(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / "hooks.pt", weights_only=True)


def test_evaluation_under_fsdp_equals_one_process(fsdp_run, tmp_path):
    # The FSDP run's checkpoint is one plain file of the whole model: a one-process run loads it
    # strictly (model.weights= reports any missing or unexpected key).
    weights = f"model.weights={fsdp_run / 'checkpoints' / 'step_6'}"
    run(xe_command(tmp_path / "one", "--eval-only", weights))
    run(xe_command(tmp_path / "two", "--eval-only", weights, "--num-gpus", "2"), env=FSDP)
    assert captions(tmp_path / "one", 0) == captions(tmp_path / "two", 0)
    assert len({c["caption"] for c in captions(tmp_path / "one", 0)}) > 1  # not one constant
    scores = [
        json.loads((tmp_path / r / "eval" / "val_step0.json").read_text()) for r in ("one", "two")
    ]
    assert scores[0] == scores[1]


def test_compiled_run_saves_plain_names_and_loads_uncompiled(tmp_path):
    out = tmp_path / "compiled"
    args = ("train.max_steps=2", "checkpoint.every=2", "eval.every=2", "train.ema_decay=0")
    log = run(xe_command(out, *args), env={"ACCELERATE_DYNAMO_BACKEND": "aot_eager"})
    assert "compile      aot_eager" in log
    checkpoint = out / "checkpoints" / "step_2"
    assert not [k for k in load_file(str(checkpoint / "model.safetensors")) if "_orig_mod" in k]
    run(xe_command(tmp_path / "plain", "--eval-only", f"model.weights={checkpoint}"))
    assert captions(tmp_path / "plain", 0) == captions(out, 2)


def torchrun_node(rank: int, port: int, output_dir: Path, cwd: Path) -> subprocess.Popen:
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1"]
    cmd += ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += xe_command(output_dir)[1:]
    return subprocess.Popen(
        cmd,
        env=subprocess_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def two_nodes(output_dir: Path, cwds: tuple[Path, Path]) -> list[tuple[int, str]]:
    from xmodaler_accel.setup import _free_port

    port = _free_port()
    nodes = [torchrun_node(rank, port, output_dir, cwd) for rank, cwd in enumerate(cwds)]
    errors = [p.communicate(timeout=300)[1] for p in nodes]
    return [(p.returncode, err) for p, err in zip(nodes, errors)]


def test_two_nodes_agree_with_two_processes_on_one(tmp_path):
    for code, err in two_nodes(tmp_path / "nodes", (tmp_path, tmp_path)):
        assert code == 0, err[-3000:]
    one = tmp_path / "one_node"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *xe_command(one)[1:]]
    run(cmd)
    for step in (2, 4, 6):
        nodes = load_final_state(tmp_path / "nodes" / "checkpoints" / f"step_{step}")
        assert_bitwise_equal(nodes, load_final_state(one / "checkpoints" / f"step_{step}"))
    assert captions(tmp_path / "nodes", 6) == captions(one, 6)


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


def test_deepspeed_settings_that_agree_pass():
    ds = {"gradient_clipping": 1.0, "zero_optimization": {}}
    plugin = SimpleNamespace(zero_stage=2, deepspeed_config=ds)
    sharding.check_engine_settings(
        settings("norm", 1.0), fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    )


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
