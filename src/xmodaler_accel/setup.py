"""The seed's set-up helpers: argument parser, run set-up, writers and `launch`."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

from .config import Config, ConfigError, save_config
from .optim import auto_scale_workers
from .writers import ConsoleTracker, JSONLTracker

logger = logging.getLogger("xmodaler_accel")

DIST_TIMEOUT_ENV = "XMODALER_DIST_TIMEOUT_S"


class _IntermixedParser(argparse.ArgumentParser):
    """Flags may come after the overrides (`... train.max_steps=9 --resume`)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def default_argument_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    """`--config`, `--resume`, `--eval-only`, launch options and `key=value` overrides."""
    parser = _IntermixedParser(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config", required=True, help="YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.weights and exit")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (launch)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://host:port of machine 0, or auto")
    parser.add_argument("opts", nargs="*", help="config overrides: train.max_steps=100")
    return parser


def make_accelerator(cfg: Config, log_with: Sequence[Any] = ()) -> Accelerator:
    """One Accelerator from config; on a machine without CUDA, several processes use gloo."""
    timeout = datetime.timedelta(seconds=int(os.environ.get(DIST_TIMEOUT_ENV, 1800)))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=list(log_with) or None,
        project_dir=cfg.output_dir,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
        # Pinned batches copied without blocking: fetching data never waits for the GPU.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"WORLD_SIZE is {expected} but Accelerate started {accelerator.num_processes} "
            "process(es); on a CPU-only machine use torchrun or launch() instead of "
            "`accelerate launch --num_processes`"
        )
    return accelerator


def default_writers(cfg: Config) -> list[Any]:
    """Console and metrics.jsonl always; TensorBoard and W&B when the config asks for them."""
    writers: list[Any] = [
        ConsoleTracker(cfg.train.max_steps),
        JSONLTracker(Path(cfg.output_dir) / "metrics.jsonl"),
    ]
    if cfg.logging.tensorboard:
        writers.append("tensorboard")
    if cfg.logging.wandb.project:
        writers.append("wandb")
    return writers


def default_setup(cfg: Config, args: argparse.Namespace | None = None) -> Accelerator:
    """Accelerator, output dir, log.txt, environment info, config backup, seeding, trackers."""
    if args is not None and getattr(args, "eval_only", False):
        check_eval_only(cfg, resume=getattr(args, "resume", False))
    accelerator = make_accelerator(cfg, default_writers(cfg))
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    setup_logging(output_dir / "log.txt", accelerator.is_main_process)
    auto_scale_workers(cfg, accelerator.num_processes)
    logger.info("environment:\n%s", environment_info(accelerator))
    if args is not None:
        logger.info("command line: %s", " ".join(sys.argv))
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
        logger.info("resolved config written to %s", output_dir / "config.yaml")
    set_seed(cfg.seed + accelerator.process_index)
    init_trackers(accelerator, cfg)
    return accelerator


def check_eval_only(cfg: Config, *, resume: bool) -> None:
    """`--eval-only` scores trained weights: `model.weights=` or `--resume`, never a random init."""
    if not resume and not cfg.model.weights:
        raise ConfigError(
            "--eval-only needs weights to score: give model.weights=<checkpoint dir or "
            ".safetensors>, or --resume to score the newest checkpoint in output_dir"
        )


def init_trackers(accelerator: Accelerator, cfg: Config) -> None:
    wandb_cfg = cfg.logging.wandb
    init_kwargs = {}
    if wandb_cfg.project:
        os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
        init_kwargs["wandb"] = {
            "dir": str(cfg.output_dir),
            "name": wandb_cfg.name or Path(cfg.output_dir).name,
            **({"entity": wandb_cfg.entity} if wandb_cfg.entity else {}),
        }
    project = wandb_cfg.project or "xmodaler-accel"
    accelerator.init_trackers(project, config=flatten_config(cfg), init_kwargs=init_kwargs)


def flatten_config(cfg: Config, prefix: str = "") -> dict[str, Any]:
    """`{"train.max_steps": 100, ...}` with lists as strings, as TensorBoard hparams require."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def setup_logging(log_file: Path, is_main: bool) -> None:
    """The main process logs INFO to stdout and `log.txt`; the others log warnings only."""
    pkg = logging.getLogger("xmodaler_accel")
    pkg.setLevel(logging.INFO if is_main else logging.WARNING)
    pkg.propagate = False
    for handler in list(pkg.handlers):
        pkg.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    pkg.addHandler(stream)
    if is_main:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        pkg.addHandler(file_handler)


def environment_info(accelerator: Accelerator) -> str:
    cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
    devices = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "cpu"
    )
    return "\n".join(
        [
            f"python       {platform.python_version()} ({sys.executable})",
            f"torch        {torch.__version__}",
            f"accelerate   {accelerate.__version__}",
            f"cuda         {cuda}",
            f"devices      {devices}",
            f"processes    {accelerator.num_processes} ({accelerator.distributed_type})",
            f"precision    {accelerator.mixed_precision}",
        ]
    )


# ------------------------------------------------------------------------------------ launch
def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: tuple = (),
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
) -> Any:
    """Run `main_func(*args)` in `num_gpus_per_machine` local processes (the seed's signature).

    Sets the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) so Accelerate joins them
    into one group; a single process runs `main_func` directly. Under `accelerate launch` or
    `torchrun` the environment is already set: call `main_func` directly there.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or "LOCAL_RANK" in os.environ:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine; give tcp://host:port")
        addr, port = "127.0.0.1", _free_port()
    else:
        addr, port = dist_url.removeprefix("tcp://").rsplit(":", 1)
    import torch.multiprocessing as mp

    mp.start_processes(
        _launch_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            args,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            addr,
            int(port),
            timeout,
        ),
        start_method="spawn",
    )
    return None


def _launch_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    args: tuple,
    world_size: int,
    per_machine: int,
    machine_rank: int,
    addr: str,
    port: int,
    timeout: datetime.timedelta,
) -> None:
    os.environ.update(
        RANK=str(machine_rank * per_machine + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(per_machine),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    os.environ[DIST_TIMEOUT_ENV] = str(int(timeout.total_seconds()))
    main_func(*args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
