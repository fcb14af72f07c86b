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
# Caption parity runs on a hand-written fixture always, and on Flickr8k where the side folder is.
FLICKR8K = Path(os.environ.get("XMODALER_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))
CAPTIONS_FIXTURE = FIXTURES / "captions" / "captions.json"
needs_flickr8k = pytest.mark.skipif(not FLICKR8K.exists(), reason=f"{FLICKR8K} is absent")
SOURCES = ["fixture", pytest.param("flickr8k", marks=needs_flickr8k)]


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


def regression_data(n: int = 64, dim: int = 8, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def mse_step(engine, batch):
    x, y = batch
    return {"loss": torch.nn.functional.mse_loss(engine.model(x), y)}


def make_engine(
    tmp_path,
    *,
    batch_size: int = 8,
    max_steps: int = 10,
    grad_accum: int = 1,
    step_fn=mse_step,
    model: torch.nn.Module | None = None,
    optimizer_fn=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    data=None,
    **engine_kwargs,
):
    from accelerate import Accelerator

    from xmodaler_accel import Engine, build_train_loader

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    model = model if model is not None else torch.nn.Linear(8, 1)
    loader = build_train_loader(data or regression_data(), batch_size, seed=3)
    return Engine(
        accelerator,
        model,
        optimizer_fn(model.parameters()),
        loader,
        step_fn,
        max_steps=max_steps,
        output_dir=tmp_path,
        **engine_kwargs,
    )
