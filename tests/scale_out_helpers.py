"""Running recipes/xe.py small, as the scale-out tests do."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import BIN, REPO, subprocess_env

XE = REPO / "recipes" / "xe.py"
SMALL = [
    "--config",
    str(REPO / "recipes" / "synthetic.yaml"),
    "data.synthetic.num_train=200",
    "data.synthetic.num_val=20",
    "data.synthetic.num_test=20",
    "eval.splits=[val]",
    "train.max_steps=6",
    "lr_scheduler.warmup_steps=2",  # updates that move the weights
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
