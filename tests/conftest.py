import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY_SCRIPT = FIXTURES / "toy_train.py"
TOY_CONFIG = FIXTURES / "toy.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "TOY_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_toy(
    output_dir: Path, *overrides: str, resume: bool = False, nproc: int = 1, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the toy recipe (torchrun for several processes); returns the finished process."""
    if nproc == 1:
        cmd = [sys.executable, str(TOY_SCRIPT)]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(TOY_SCRIPT)]
    cmd += ["--config", str(TOY_CONFIG)] + (["--resume"] if resume else [])
    cmd += [f"output_dir={output_dir}", *overrides]
    return subprocess.run(
        cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=300
    )


def load_final_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Model weights and flattened optimizer state of one checkpoint, for bitwise comparison."""
    from safetensors.torch import load_file

    state = {f"model.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            state[f"optim.{pid}.{key}"] = torch.as_tensor(value)
    return state


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
