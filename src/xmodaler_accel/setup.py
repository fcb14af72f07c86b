"""The seed's set-up helpers: argument parser, run set-up, writers and `launch`."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)

from . import sharding
from .checkpoint import read_trainer_state
from .config import Config, ConfigError, flatten, save_config
from .errors import UserError
from .optim import auto_scale_workers
from .run_dir import check_new_run_dir, clear_run_dir, resume_checkpoint
from .samplers import steps_per_epoch
from .writers import ConsoleTracker, JSONLTracker

logger = logging.getLogger("xmodaler_accel")

DIST_TIMEOUT_ENV = "XMODALER_DIST_TIMEOUT_S"


class _IntermixedParser(argparse.ArgumentParser):
    """Flags may come after the overrides (`... train.max_steps=9 --resume`)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def default_argument_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    """`--config`, `--resume`, `--overwrite`, `--eval-only`, the options of `launch()` and
    `key=value` overrides."""
    parser = _IntermixedParser(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config", required=True, help="YAML")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir (newest checkpoint)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run in output_dir and start again"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.weights and exit")
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes to start on this machine (launch)"
    )
    parser.add_argument("--num-machines", type=int, default=1, help="machines in the job (launch)")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (launch)")
    parser.add_argument(
        "--dist-url", default="auto", help="tcp://host:port of machine 0; auto on one machine"
    )
    parser.add_argument("opts", nargs="*", help="config overrides: train.max_steps=100")
    return parser


def make_accelerator(cfg: Config, log_with: Sequence[Any] = ()) -> Accelerator:
    """One Accelerator from config; on a machine without CUDA, several processes use gloo.

    Call `resolve_launcher_settings(cfg)` first (default_setup does): the config then holds the
    precision and accumulation that run, and the Accelerator is given exactly those."""
    check_process_count()
    cpu = not torch.cuda.is_available()
    if cpu:
        sharding.check_cpu_engine()
    timeout = datetime.timedelta(seconds=int(os.environ.get(DIST_TIMEOUT_ENV, 1800)))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=list(log_with) or None,
        project_dir=cfg.output_dir,
        cpu=cpu,
        step_scheduler_with_optimizer=False,
        # Pinned batches copied without blocking: fetching data never waits for the GPU.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"WORLD_SIZE is {expected} but Accelerate started {accelerator.num_processes} "
            "process(es); on a CPU-only machine use torchrun or --num-gpus instead of "
            "`accelerate launch --num_processes`"
        )
    if cpu and sharding.wants_fsdp():
        sharding.fsdp_on_cpu(accelerator, cfg.mixed_precision)
    sharding.check_engine_settings(cfg, accelerator)
    return accelerator


# ------------------------------------------------------------------ what the launcher asks for
def resolve_launcher_settings(cfg: Config, env: Mapping[str, str] | None = None) -> None:
    """Set `mixed_precision` and `train.grad_accum` to what will run, in place.

    A key left null in the config takes the launcher's setting (`accelerate launch
    --mixed_precision`, `accelerate config`, ACCELERATE_GRADIENT_ACCUMULATION_STEPS), else the
    default ("no", 1). A key set in the config wins over an unset launcher; set in both and
    different is an error naming both. `accelerate launch` always passes a precision, "no" when
    given none, so a launcher "no" counts as unset: override `mixed_precision=no` to force fp32.
    """
    env = os.environ if env is None else env
    launcher_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    cfg.mixed_precision = _agree(
        "mixed_precision",
        cfg.mixed_precision,
        None if launcher_precision == "no" else launcher_precision,
        "ACCELERATE_MIXED_PRECISION (accelerate launch --mixed_precision / accelerate config)",
        default="no",
    )
    launcher_accum = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_accum is None and _flag(_accelerate_launch_argv(), "gradient_accumulation_steps"):
        raise ConfigError(
            "accelerate launch --gradient_accumulation_steps reaches the script only with "
            "DeepSpeed, so it would be ignored here: give train.grad_accum=<n> instead"
        )
    cfg.train.grad_accum = _agree(
        "train.grad_accum",
        cfg.train.grad_accum,
        None if launcher_accum is None else int(launcher_accum),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS (set by accelerate launch)",
        default=1,
    )
    if cfg.train.grad_accum < 1:
        raise ConfigError(
            f"config key 'train.grad_accum': must be >= 1, got {cfg.train.grad_accum}"
        )


def _agree(key: str, ours: Any, launcher: Any, launcher_name: str, default: Any) -> Any:
    if ours is None:
        return default if launcher is None else launcher
    if launcher is not None and launcher != ours:
        raise ConfigError(
            f"config key '{key}' is {ours!r} but the launcher asks for {launcher!r} via "
            f"{launcher_name}: drop one of the two, or make them agree"
        )
    return ours


def check_process_count() -> None:
    """`accelerate launch --num_processes N` on a machine without GPUs starts ONE process that
    knows nothing of the other N-1 (the launcher sets MASTER_ADDR but no WORLD_SIZE): stop there
    rather than train a different job than the one asked for."""
    argv = [] if "WORLD_SIZE" in os.environ else _accelerate_launch_argv()
    if not argv:
        return
    asked = _flag(argv, "num_processes")
    # Without the flag, `accelerate config`'s count: the launcher sets MASTER_ADDR when it is > 1.
    if (int(asked) > 1) if asked else "MASTER_ADDR" in os.environ:
        raise ConfigError(
            f"accelerate launch asked for {asked or 'several'} processes but started one (on a "
            "machine without GPUs it runs the script once): use "
            "`python <recipe> --num-gpus N ...` or `torchrun --nproc_per_node N <recipe> ...`"
        )


def _accelerate_launch_argv() -> list[str]:
    """The command line of `accelerate launch` when it is this process's parent (Linux), else []."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    argv = raw.decode(errors="replace").split("\0")
    is_accelerate = any(
        Path(a).name == "accelerate" or "accelerate.commands" in a for a in argv[:3]
    )
    return argv if is_accelerate and "launch" in argv else []


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name`/`--name=` (either - or _ between words) in `argv`, or None."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in spellings:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def default_writers(cfg: Config) -> list[Any]:
    """Console and metrics.jsonl always; TensorBoard and W&B when the config asks for them."""
    writers: list[Any] = [
        ConsoleTracker(lambda: cfg.train.max_steps),  # known once resolve_epochs has run
        JSONLTracker(Path(cfg.output_dir) / "metrics.jsonl"),
    ]
    if cfg.logging.tensorboard:
        writers.append("tensorboard")
    if cfg.logging.wandb.project:
        writers.append("wandb")
    return writers


def default_setup(cfg: Config, args: argparse.Namespace | None = None) -> Accelerator:
    """Check the command against the output dir, then: Accelerator, log.txt, environment info,
    config backup, seeding, trackers. Nothing is written before every check has passed."""
    resume = bool(args is not None and args.resume)
    eval_only = bool(args is not None and args.eval_only)
    overwrite = bool(args is not None and getattr(args, "overwrite", False))
    if eval_only:
        check_eval_only(cfg, resume=resume)
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in output_dir, --overwrite deletes it: give one"
        )
    resolve_launcher_settings(cfg)
    output_dir = Path(cfg.output_dir)
    checkpoint = resume_checkpoint(cfg, evaluate_only=eval_only) if resume else None
    if not resume and not eval_only:
        check_new_run_dir(output_dir, overwrite)
    accelerator = make_accelerator(cfg, default_writers(cfg))
    if accelerator.is_main_process:
        if overwrite:
            clear_run_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    check_shared_output_dir(accelerator, output_dir)
    setup_logging(output_dir / "log.txt", accelerator.is_main_process)
    auto_scale_workers(cfg, accelerator.num_processes)
    logger.info("environment:\n%s", environment_info(accelerator))
    if args is not None:
        logger.info("command line: %s", " ".join(sys.argv))
    # --eval-only leaves the training run's config.yaml as it is.
    if accelerator.is_main_process and not (eval_only and (output_dir / "config.yaml").exists()):
        save_config(cfg, output_dir / "config.yaml")
        logger.info("resolved config written to %s", output_dir / "config.yaml")
    set_seed(cfg.seed + accelerator.process_index)
    wandb_id = read_trainer_state(checkpoint).get("wandb_run_id") if checkpoint else None
    init_trackers(accelerator, cfg, wandb_run_id=wandb_id)
    return accelerator


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """On several machines every process writes into output_dir (its RNG state in each
    checkpoint; DeepSpeed its shards): check that all of them see the same folder (collective)."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) >= (
        accelerator.num_processes
    ):
        return  # one machine
    marker = output_dir / ".shared-check"
    token = [os.urandom(8).hex() if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        marker.write_text(token[0])
    broadcast_object_list(token)
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    blind = accelerator.gather(torch.tensor([float(not seen)], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if blind.sum().item() > 0:
        raise ConfigError(
            f"output_dir {output_dir} is not shared: {int(blind.sum().item())} process(es) on "
            "other machines cannot see what rank 0 wrote there. Every process writes into each "
            "checkpoint: put output_dir on a filesystem all machines mount (NFS, Lustre, ...)"
        )


# Settings given in epochs, and the step settings they become (X-modaler counts in epochs).
EPOCH_SETTINGS = (
    ("train.epochs", "train.max_steps"),
    ("eval.every_epochs", "eval.every"),
    ("checkpoint.every_epochs", "checkpoint.every"),
    ("lr_scheduler.step_size_epochs", "lr_scheduler.step_size"),
)


def resolve_epochs(cfg: Config, accelerator: Accelerator, train_loader: Any) -> int:
    """Turn the `EPOCH_SETTINGS` (`train.epochs`, `*.every_epochs` ...) into the step counts
    the Engine and hooks use, for this dataset, global batch and world size; return the steps per
    epoch. Call it once the train loader is built, before the LR schedule (which needs
    `train.max_steps`). A step setting given as well must agree: one length, never two."""
    per_epoch = steps_per_epoch(
        len(train_loader.dataset),
        train_loader.batch_size,
        num_processes=accelerator.num_processes,
        grad_accum=accelerator.gradient_accumulation_steps,
        drop_last=train_loader.drop_last,
    )
    batch = (
        f"{len(train_loader.dataset)} samples, {train_loader.batch_size} per batch x "
        f"{accelerator.num_processes} processes x {accelerator.gradient_accumulation_steps} "
        "accumulation"
    )
    if per_epoch < 1:
        raise ConfigError(f"an epoch is shorter than one optimizer step ({batch})")
    for epochs_key, steps_key in EPOCH_SETTINGS:
        epochs, given = cfg.get_path(epochs_key), cfg.get_path(steps_key)
        if epochs is None:
            continue
        steps = epochs * per_epoch
        if given and given != steps:
            raise ConfigError(
                f"config keys '{epochs_key}' ({epochs} = {steps} steps of {per_epoch} per epoch: "
                f"{batch}) and '{steps_key}' ({given}) disagree: give one, e.g. {steps_key}=null"
            )
        section, key = steps_key.split(".")
        cfg[section][key] = steps
        logger.info("%s %d: %s %d (%d steps per epoch: %s)", epochs_key, epochs, steps_key,
                    steps, per_epoch, batch)  # fmt: skip
    if not cfg.train.max_steps:
        raise ConfigError("give the training length: train.max_steps=<steps> or train.epochs=<n>")
    return per_epoch


def check_eval_only(cfg: Config, *, resume: bool) -> None:
    """`--eval-only` scores trained weights: `model.weights=` or `--resume`, never a random init."""
    if not resume and not cfg.model.weights:
        raise ConfigError(
            "--eval-only needs weights to score: give model.weights=<checkpoint dir or "
            ".safetensors>, or --resume to score the newest checkpoint in output_dir"
        )


def init_trackers(accelerator: Accelerator, cfg: Config, wandb_run_id: str | None = None) -> None:
    """Start the trackers; with `wandb_run_id` (saved in the checkpoint `--resume` continues
    from) W&B continues that run, so a preempted job stays one run."""
    wandb_cfg = cfg.logging.wandb
    init_kwargs = {}
    if wandb_cfg.project:
        os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
        init_kwargs["wandb"] = {
            "dir": str(cfg.output_dir),
            "name": wandb_cfg.name or Path(cfg.output_dir).name,
            **({"entity": wandb_cfg.entity} if wandb_cfg.entity else {}),
            **({"id": wandb_run_id, "resume": "allow"} if wandb_run_id else {}),
        }
    project = wandb_cfg.project or "xmodaler-accel"
    accelerator.init_trackers(project, config=flatten_config(cfg), init_kwargs=init_kwargs)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """`{"train.max_steps": 100, ...}` with lists as strings, as TensorBoard hparams require."""
    plain = (bool, int, float, str)
    return {k: v if isinstance(v, plain) else str(v) for k, v in flatten(cfg).items()}


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
            f"processes    {accelerator.num_processes} ({sharding.engine_name(accelerator)})",
            f"compile      {accelerator.state.dynamo_plugin.backend.value.lower()}",
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
    """Run `main_func(*args)` in `num_gpus_per_machine` processes on each of `num_machines`
    machines (detectron2's and X-modaler's signature; recipes pass `--num-gpus`,
    `--num-machines`, `--machine-rank` and `--dist-url` here).

    Sets the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) so Accelerate joins the
    processes into one group; one process in all runs `main_func` directly. Under `accelerate
    launch` or `torchrun` the launcher has started the processes: more than one here is refused.
    A config, data or checkpoint error prints one line and exits with status 2 (no traceback).
    """
    world_size = num_machines * num_gpus_per_machine
    if num_gpus_per_machine < 1 or not 0 <= machine_rank < num_machines:
        _exit_user_error(
            ConfigError(
                f"--num-gpus {num_gpus_per_machine} --num-machines {num_machines} "
                f"--machine-rank {machine_rank}: need --num-gpus >= 1 and "
                "0 <= --machine-rank < --num-machines"
            )
        )
    if "LOCAL_RANK" in os.environ and world_size > 1:
        _exit_user_error(
            ConfigError(
                f"--num-gpus {num_gpus_per_machine} --num-machines {num_machines} start "
                "processes, and this one was already started by a launcher (accelerate launch "
                "/ torchrun): give the process count to the launcher only"
            )
        )
    if world_size <= 1 or "LOCAL_RANK" in os.environ:
        return _run_reporting(main_func, args)
    if dist_url == "auto":
        if num_machines != 1:
            _exit_user_error(
                ConfigError("--dist-url auto works on one machine; give tcp://host:port")
            )
        addr, port = "127.0.0.1", _free_port()
    else:
        addr, port = dist_url.removeprefix("tcp://").rsplit(":", 1)
    import torch.multiprocessing as mp

    try:
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
    except mp.ProcessExitedException as err:  # the worker has printed why
        sys.exit(err.exit_code if err.exit_code and err.exit_code > 0 else 1)
    return None


def _run_reporting(main_func: Callable[..., Any], args: tuple) -> Any:
    try:
        return main_func(*args)
    except UserError as err:
        _exit_user_error(err)


def _exit_user_error(err: Exception) -> None:
    """One line on stderr, status 2. A config error is the same on every process: rank 0 says it."""
    if not isinstance(err, ConfigError) or int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.exit(2)


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
    _run_reporting(main_func, args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
