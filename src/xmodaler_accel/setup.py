"""The seed's set-up helpers: argument parser, run set-up, writers and `launch`."""

from __future__ import annotations

import argparse
import configparser
import datetime
import importlib.util
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
from .cli import default_argument_parser  # noqa: F401  (its home before cli.py)
from .config import Config, ConfigError, config_yaml, flatten, save_config
from .errors import UserError
from .optim import auto_scale_workers
from .run_dir import check_new_run_dir, clear_run_dir, resume_checkpoint
from .samplers import steps_per_epoch
from .writers import ConsoleTracker, JSONLTracker, WandBWriter

logger = logging.getLogger("xmodaler_accel")

DIST_TIMEOUT_ENV = "XMODALER_DIST_TIMEOUT_S"


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


def default_writers(cfg: Config, env: Mapping[str, str] | None = None) -> list[Any]:
    """Console and metrics.jsonl always; TensorBoard and W&B when the config asks for them.

    W&B's settings are checked here, before anything is written: `logging.wandb.*` against the
    WANDB_* variables and W&B's settings files (`resolve_wandb_settings`); the mode that will
    run is written back into `logging.wandb.mode`, so `config.yaml` records it."""
    writers: list[Any] = [
        # max_steps is known once resolve_epochs has run
        ConsoleTracker(lambda: cfg.train.max_steps, cfg.logging.console_fields),
        JSONLTracker(Path(cfg.output_dir) / "metrics.jsonl"),
    ]
    if cfg.logging.tensorboard:
        writers.append("tensorboard")
    if cfg.logging.wandb.project:
        init_kwargs = resolve_wandb_settings(cfg, env)
        if init_kwargs["mode"] != "disabled":
            writers.append(WandBWriter(cfg.logging.wandb.project, **init_kwargs))
    return writers


# W&B's own names for its modes, the older ones included (`dryrun` is offline, `run` online).
WANDB_MODES = ("online", "offline", "disabled")
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# logging.wandb.<key> and the variable W&B reads for the same setting.
_WANDB_ENV = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "name": "WANDB_NAME"}


def resolve_wandb_mode(
    key: str | None,
    env: Mapping[str, str] | None = None,
    settings_files: Sequence[Path] | None = None,
) -> tuple[str, str]:
    """The W&B mode a run starts in, and where it comes from, by W&B's own rules.

    `logging.wandb.mode` (`key`) left null: WANDB_MODE, else the mode `wandb offline` / `wandb
    online` left in W&B's settings files (`./wandb/settings` of the working directory, then
    `$WANDB_CONFIG_DIR/settings` or `~/.config/wandb/settings`), else "online". A key that is
    set is used; set and different from WANDB_MODE or a settings file's mode is a ConfigError
    naming both (W&B itself would let the key win without a word).
    """
    env = os.environ if env is None else env
    env_mode = _wandb_mode_value(env.get("WANDB_MODE") or None, "WANDB_MODE")
    file_mode, file_path = _wandb_settings_file_mode(env, settings_files)
    if key is None:
        if env_mode:
            return env_mode, "WANDB_MODE"
        if file_mode:
            return file_mode, f"{file_path} (wandb offline / wandb online)"
        return "online", "W&B's default"
    key = _wandb_mode_value(key, "config key 'logging.wandb.mode'")
    if env_mode and env_mode != key:
        raise ConfigError(
            f"config key 'logging.wandb.mode' is {key!r} but WANDB_MODE is {env_mode!r}: drop "
            "one of the two (logging.wandb.mode=null follows WANDB_MODE), or make them agree"
        )
    if file_mode and not env_mode and file_mode != key:
        raise ConfigError(
            f"config key 'logging.wandb.mode' is {key!r} but W&B's settings file {file_path} "
            f"says {file_mode!r} (`wandb {file_mode}`): drop one of the two (run `wandb "
            f"{key}`, or logging.wandb.mode=null to follow the file), or make them agree"
        )
    return key, "config key 'logging.wandb.mode'"


def _wandb_mode_value(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    mode = _WANDB_MODE_ALIASES.get(str(value).lower(), str(value).lower())
    if mode not in WANDB_MODES:
        raise ConfigError(f"{source}: {value!r} is not a W&B mode ({', '.join(WANDB_MODES)})")
    return mode


def _wandb_settings_file_mode(
    env: Mapping[str, str], files: Sequence[Path] | None = None
) -> tuple[str | None, str]:
    """The `mode` in W&B's settings files (the workspace's first), as `wandb.init` reads them:
    `wandb offline` writes `mode = offline` into `./wandb/settings`, `wandb online` removes it."""
    if files is None:
        config_dir = env.get("WANDB_CONFIG_DIR")
        global_file = Path(config_dir or "~/.config/wandb").expanduser() / "settings"
        # W&B uses ./.wandb instead of ./wandb when that folder exists.
        workspace = Path.cwd() / (".wandb" if (Path.cwd() / ".wandb").exists() else "wandb")
        files = (workspace / "settings", global_file)
    for path in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue  # W&B warns and ignores an unreadable file
        mode = parser.get("default", "mode", fallback=None)
        if mode:
            return _wandb_mode_value(mode, f"W&B's settings file {path}"), str(path)
    return None, ""


def resolve_wandb_settings(cfg: Config, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`wandb.init` arguments from `logging.wandb.*`, each set key checked against the variable
    W&B reads for it (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME): set in both and
    different is a ConfigError naming both; a key left empty leaves the variable to W&B. Writes
    the mode that will run into `logging.wandb.mode`."""
    env = os.environ if env is None else env
    wandb_cfg = cfg.logging.wandb
    mode, source = resolve_wandb_mode(wandb_cfg.mode, env)
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config key 'logging.wandb.project' is {wandb_cfg.project!r} but wandb is not "
            "installed: `pip install 'xmodaler-accel[wandb]'` (or wandb), or logging.wandb.project='' to log without W&B"
        )
    for key, var in _WANDB_ENV.items():
        ours, theirs = wandb_cfg[key], env.get(var)
        if ours and theirs and ours != theirs:
            raise ConfigError(
                f"config key 'logging.wandb.{key}' is {ours!r} but {var} is {theirs!r}: drop one "
                "of the two, or make them agree"
            )
    wandb_cfg.mode = mode
    kwargs: dict[str, Any] = {"mode": mode, "mode_source": source}  # WandBWriter keeps the source
    if wandb_cfg.entity:
        kwargs["entity"] = wandb_cfg.entity
    if wandb_cfg.name or not env.get("WANDB_NAME"):
        kwargs["name"] = wandb_cfg.name or Path(cfg.output_dir).name
    if not env.get("WANDB_DIR"):  # W&B's variable for where its files go (wandb agent sets it)
        kwargs["dir"] = str(cfg.output_dir)
    return kwargs


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
    if args is not None and getattr(args, "print_config", False):
        print_config(cfg, args)  # exits: nothing written, no Accelerator
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


def print_config(cfg: Config, args: argparse.Namespace | None = None) -> None:
    """`--print-config`: print the config as `default_setup` writes it to config.yaml (launcher
    settings, W&B mode and `train.auto_scale_workers` applied) on stdout, then exit 0. Call it
    after `resolve_launcher_settings`; it writes nothing and starts nothing."""
    if cfg.logging.wandb.project:
        resolve_wandb_settings(cfg)
    launched = getattr(args, "num_gpus", 1) * getattr(args, "num_machines", 1)
    auto_scale_workers(cfg, int(os.environ.get("WORLD_SIZE", 0)) or launched)
    if int(os.environ.get("RANK", 0)) == 0:  # under a launcher, once
        sys.stdout.write(config_yaml(cfg))
        sys.stdout.flush()
    sys.exit(0)


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
    from) W&B continues that run, so a preempted job stays one run. The W&B run's config holds
    the resolved config and the environment block of `log.txt` (`environment.*`)."""
    for tracker in accelerator.log_with:
        if isinstance(tracker, WandBWriter):
            logger.info("W&B: project %s, mode %s (%s)", cfg.logging.wandb.project,
                        tracker.init_kwargs["mode"], tracker.mode_source)  # fmt: skip
            tracker.init_kwargs["config"] = {"environment": _environment_dict(accelerator)}
            if wandb_run_id:
                tracker.init_kwargs.update(id=wandb_run_id, resume="allow")
    project = cfg.logging.wandb.project or "xmodaler-accel"
    accelerator.init_trackers(project, config=flatten_config(cfg))


def _environment_dict(accelerator: Accelerator) -> dict[str, str]:
    """`environment_info` as {"python": "3.11.2 (/usr/bin/python3)", "torch": ...}."""
    rows = (line.split(None, 1) for line in environment_info(accelerator).splitlines())
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows if row}


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
    With `--print-config` among `args`, `main_func` runs once, here: it prints the config and
    exits in `default_setup`.
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
    if any(getattr(arg, "print_config", False) for arg in args):
        return _run_reporting(main_func, args)
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
