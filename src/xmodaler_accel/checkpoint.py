"""Atomic, verified, exact-resume checkpoints, and weights-only loading.

Layout of `checkpoints/<prefix>_<step>/`: `model.safetensors` (the whole model, one plain file
whatever engine trained it: `model.weights=` takes it), `optimizer.pt` (the whole optimizer state,
keyed by parameter name; under DeepSpeed its own partitioned `deepspeed/` folder instead),
`scheduler.pt`, `scaler.pt` (fp16 only), `hooks.pt`, `rng_<rank>.pt` (one per process),
`trainer_state.json`, `config.yaml` (when the Engine is given the run's config) and, written last,
`manifest.json`: the path, size and sha256 of every other file. Every process writes into the
same folder: several machines need a shared filesystem (`setup.check_shared_output_dir`). Everything is written into `.tmp-<name>/` and renamed
into place, so a directory without the `.tmp-` prefix is complete; a failed write (disk full)
removes the temp dir and raises. `find_resume_checkpoint` checks checkpoints against their
manifest, newest first, and skips (with a warning naming the file) any that was damaged since.
Every `.pt` file holds tensors and plain Python containers only and is read with
`torch.load(weights_only=True)`: loading a checkpoint never unpickles arbitrary objects (DeepSpeed
reads its own folder itself). Sharded engines gather through `sharding` (Accelerate's
`get_state_dict`, PyTorch's distributed state-dict API), so the files are the same under DDP,
FSDP, DeepSpeed and torch.compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file

from . import sharding
from .config import Config
from .errors import UserError
from .port.weights import from_xmodaler, looks_like_xmodaler
from .writers import wandb_tracker

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
REQUIRED_FILES = (STATE_FILE, MODEL_FILE, "hooks.pt", MANIFEST_FILE)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the path at fault."""


# ---------------------------------------------------------------- RNG state (no pickled objects)
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_kept():
    """Run a block (evaluation, PreciseBN) without moving any RNG: the states are put back after
    it, so it never changes the training that follows nor what a resumed run replays."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ---------------------------------------------------------------- writing
def write_checkpoint(
    accelerator: Any,
    root: str | os.PathLike,
    name: str,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    hook_states: dict[str, Any],
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically; collective (every process must call it). A write
    that fails on any process (disk full) removes the temp dir and raises CheckpointError on all."""
    root = Path(root)
    tmp, final = root / f".tmp-{name}", root / name
    main = accelerator.is_main_process
    error = _attempt(_make_empty_dir, tmp) if main else None
    accelerator.wait_for_everyone()
    if error is None:
        rng = capture_rng_state()
        error = _attempt(_save_torch, rng, tmp / f"rng_{accelerator.process_index}.pt")
    rng_written = not _any_process(accelerator, error is not None)
    if rng_written:
        weights, optimizer_state = _engine_states(accelerator, model, optimizer, tmp)
    if rng_written and main:
        parts = (weights, optimizer_state, scheduler, trainer_state, hook_states, config)
        error = _attempt(_write_main_files, accelerator, tmp, final, *parts)
    if _any_process(accelerator, error is not None):
        raise _write_failed(root, tmp, final, error, main) from error
    return final


def _engine_states(
    accelerator: Any, model: torch.nn.Module, optimizer: Any, tmp: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model weights, optimizer state), whole, on the main process (collective: sharded engines
    gather them). DeepSpeed writes its partitioned optimizer into `deepspeed/` from every process."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    weights = sharding.without_tied_copies(sharding.model_state(accelerator, model), unwrapped)
    if sharding.is_deepspeed(accelerator):
        model.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        return weights, None
    return weights, sharding.optimizer_state(accelerator, model, optimizer)


def _write_main_files(
    accelerator: Any,
    tmp: Path,
    final: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    hook_states: dict[str, Any],
    config: Mapping[str, Any] | None,
) -> None:
    """Everything but the RNG files, the manifest last, then the rename (main process)."""
    with _writing(tmp / MODEL_FILE):
        weights = {name: t.contiguous() for name, t in weights.items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    if optimizer_state is not None:
        _save_torch(optimizer_state, tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
    if accelerator.scaler is not None:
        _save_torch(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    _save_torch(hook_states, tmp / "hooks.pt")
    state = dict(trainer_state, world_size=accelerator.num_processes, **_tracker_ids(accelerator))
    _write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
    if config is not None:
        _write_text(tmp / CONFIG_FILE, yaml.safe_dump(Config(config).to_dict(), sort_keys=False))
    _write_text(tmp / MANIFEST_FILE, json.dumps(_manifest(tmp), indent=2))
    _fsync_tree(tmp)
    _replace_dir(tmp, final)


def _tracker_ids(accelerator: Any) -> dict[str, str]:
    """The W&B run id, so that a resumed run logs into the same W&B run."""
    tracker = wandb_tracker(accelerator)
    return {} if tracker is None else {"wandb_run_id": tracker.run.id}


def _manifest(directory: Path) -> dict[str, Any]:
    files = [p for p in _files(directory) if p != directory / MANIFEST_FILE]
    return {
        "files": {
            p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        }
    }


def _files(directory: Path) -> list[Path]:
    """Every file under `directory` (DeepSpeed's folder too), sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _attempt(fn: Callable[..., Any], *args: Any) -> Exception | None:
    """Run `fn`; the exception it raised, kept until the processes agree that a write failed."""
    try:
        fn(*args)
    except Exception as err:
        return err
    return None


def _any_process(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is set on any process (collective: a barrier that carries one flag)."""
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.max().item())


def _write_failed(
    root: Path, tmp: Path, final: Path, error: Exception | None, main: bool
) -> CheckpointError:
    message = f"could not write checkpoint {final}: {error or 'it failed on another process'}"
    if not main:
        return CheckpointError(message)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = _newest_intact(root, final.name.rpartition("_")[0])
    if previous is None:
        return CheckpointError(f"{message}; there is no previous checkpoint")
    return CheckpointError(f"{message}; the previous checkpoint {previous} is intact")


def _newest_intact(root: Path, prefix: str) -> Path | None:
    try:
        return find_resume_checkpoint(root, prefix)
    except CheckpointError:
        return None


def _make_empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


@contextmanager
def _writing(path: Path):
    """Name the file in any error raised while writing it."""
    try:
        yield
    except Exception as err:
        raise CheckpointError(f"{path.name}: {err}") from err


def _save_torch(obj: Any, path: Path) -> None:
    with _writing(path), open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # a failed write shows as "unexpected pos"; say why it failed
            cause = err.__context__
            raise (cause if isinstance(cause, OSError) else err) from err
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with _writing(path):
        path.write_text(text)


def _fsync_tree(path: Path) -> None:
    for file in _files(path):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed after."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- finding and pruning
def list_checkpoints(root: str | os.PathLike, prefix: str = "step") -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, path); not verified."""
    return [
        (step, path)
        for step, path in _checkpoint_dirs(root, prefix)
        if all((path / f).is_file() for f in REQUIRED_FILES)
    ]


def _checkpoint_dirs(root: str | os.PathLike, prefix: str) -> list[tuple[int, Path]]:
    """Every `<prefix>_<step>` directory under `root`, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found = []
    for path in root.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike, prefix: str = "step") -> Path | None:
    found = list_checkpoints(root, prefix)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep: int, prefix: str = "step") -> None:
    """Keep the newest `keep` complete checkpoints (keep <= 0 keeps all); drop stale temp dirs."""
    root = Path(root)
    if keep > 0:
        for _, path in list_checkpoints(root, prefix)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- verifying
def find_resume_checkpoint(root: str | os.PathLike, prefix: str = "step") -> Path | None:
    """The newest checkpoint under `root` that matches its manifest; each newer one that does not
    is skipped with one warning naming the file at fault. None when there is no checkpoint at
    all; CheckpointError when there are some but none is intact."""
    found = _checkpoint_dirs(root, prefix)
    for _, path in reversed(found):
        problem, first_time = _verify(path)
        if problem is None:
            return path
        if first_time:
            logger.warning("skipping %s: %s", path, problem)
    if found:
        reasons = "; ".join(f"{path.name}: {_verify(path)[0]}" for _, path in reversed(found))
        raise CheckpointError(f"no intact checkpoint under {root} ({reasons})")
    return None


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself, after checking it against its manifest (CheckpointError naming the file)."""
    path = Path(path)
    problem, _ = _verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return path


# (path, each file's name, inode, size and mtime) -> problem; a process hashes a checkpoint once.
_VERIFIED: dict[tuple, str | None] = {}


def _verify(path: Path) -> tuple[str | None, bool]:
    """(why `path` fails its manifest or None, whether this call found it out)."""
    key = _stat_key(path)
    if key in _VERIFIED:
        return _VERIFIED[key], False
    _VERIFIED[key] = _manifest_problem(path)
    return _VERIFIED[key], True


def _stat_key(path: Path) -> tuple:
    stats = []
    for file in _files(path) if path.is_dir() else []:
        st = file.stat()
        stats.append((file.relative_to(path).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns))
    return (str(path.resolve()), tuple(stats))


def _manifest_problem(path: Path) -> str | None:
    """Why `path` does not match its manifest ("optimizer.pt is missing"); None when intact."""
    if not path.is_dir():
        return "no such directory"
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return f"{MANIFEST_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    unlisted = [f for f in REQUIRED_FILES if f not in files and f != MANIFEST_FILE]
    if unlisted:
        return f"{MANIFEST_FILE} does not list {', '.join(unlisted)}"
    for name, size, _ in entries:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST_FILE} says {size}"
    for name, _, sha256 in entries:
        if _sha256(path / name) != sha256:
            return f"{name} does not match its sha256 in {MANIFEST_FILE}"
    return None


# ---------------------------------------------------------------- reading
def read_checkpoint(
    accelerator: Any,
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer, scheduler, scaler and this process's RNG; return (state, hooks).
    Any file that is missing or unreadable is a CheckpointError naming it."""
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = read_trainer_state(path)
    if sharding.is_deepspeed(accelerator):
        _read_deepspeed_state(model, path)
    else:
        _read_engine_states(accelerator, path, model, optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(_load_torch(_require(path / "scheduler.pt")))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_torch(path / "scaler.pt"))
    if state.get("world_size") == accelerator.num_processes:
        restore_rng_state(_load_torch(_require(path / f"rng_{accelerator.process_index}.pt")))
    else:
        logger.warning(
            "checkpoint %s was written by %s processes, resuming with %s: the data order is "
            "kept, but random streams (dropout, sampling) are re-seeded per process",
            path,
            state.get("world_size"),
            accelerator.num_processes,
        )
    return state, _load_torch(path / "hooks.pt")


def _read_engine_states(
    accelerator: Any, path: Path, model: torch.nn.Module, optimizer: Any
) -> None:
    """The whole model and optimizer, read by every process, laid out by the engine."""
    if (path / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(
            f"checkpoint {path} was written under DeepSpeed, whose optimizer state only DeepSpeed "
            "reads: resume under DeepSpeed, or start a new run from its weights "
            f"(model.weights={path / MODEL_FILE})"
        )
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    try:
        weights = load_file(str(path / MODEL_FILE), device="cpu")
    except Exception as err:  # truncated or corrupt file
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {err}") from err
    with _reading(path / MODEL_FILE):
        weights = sharding.with_tied_copies(weights, unwrapped)
        sharding.load_model_state(accelerator, model, weights)
    optimizer_state = _load_torch(_require(path / OPTIMIZER_FILE))
    with _reading(path / OPTIMIZER_FILE):
        sharding.load_optimizer_state(accelerator, model, optimizer, optimizer_state)


def _read_deepspeed_state(model: Any, path: Path) -> None:
    if not (path / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(
            f"checkpoint {path} was not written under DeepSpeed (no {DEEPSPEED_DIR}/ folder): "
            "resume it with the engine that wrote it, or start a new run from its weights "
            f"(model.weights={path / MODEL_FILE})"
        )
    with _reading(path / DEEPSPEED_DIR):
        loaded, _ = model.load_checkpoint(
            str(path / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # ours is in scheduler.pt
        )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path / DEEPSPEED_DIR}")


@contextmanager
def _reading(path: Path):
    """Name the file in any error raised while loading it (keys or shapes that do not match)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot load {path}: {err}") from err


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `trainer_state.json` (step, epoch, world_size, wandb_run_id, ...)."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read {file}: not a JSON object")
    return state


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written with; None when it holds no `config.yaml`."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read {file}: not a mapping")
    return config


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    return path


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or an object that is not plain data
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _load_safetensors(model: torch.nn.Module, path: Path, strict: bool) -> tuple[list, list]:
    try:
        return load_model(model, str(path), strict=strict, device="cpu")
    except Exception as err:  # truncated or corrupt file, or (strict) keys that do not match
        raise CheckpointError(f"cannot read {path}: {err}") from err


# ---------------------------------------------------------------- weights only
def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load weights only (the seed's `resume_or_load` with resume off).

    `path` is a checkpoint directory, a `.safetensors` file, or a `.pt`/`.pth` state dict (read with
    `weights_only=True`; an X-modaler `{"model": state_dict}` file works too). Missing and
    unexpected keys are reported by name: an error when `strict`, a warning otherwise.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"model.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        # load_model knows the tensors that save_model wrote once for several names (tied weights).
        missing, unexpected = _load_safetensors(model, path, strict=False)
    else:
        state = _load_torch(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if looks_like_xmodaler(state):  # X-modaler's names, renamed by port.weights' one table
            state = from_xmodaler(state, model)
        state = sharding.strip_compiled(state)  # a compiled model's own state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
    if (missing or unexpected) and strict:
        _refuse_pretraining_checkpoint(path)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if problems and strict:
        raise CheckpointError(f"weights {path} do not match the model; " + "; ".join(problems))
    for problem in problems:
        logger.warning("weights %s: %s", path, problem)


def _refuse_pretraining_checkpoint(path: Path) -> None:
    """A pretraining run's checkpoint holds its whole two-stream model; fine-tuning takes one of
    the files its export writes (X-modaler users pass the checkpoint itself)."""
    config = read_checkpoint_config(path.parent) if path.name == MODEL_FILE else None
    if not config or "pretrain" not in config:
        return
    export = Path(config["output_dir"]) / config["pretrain"].get("export_dir", "export")
    raise CheckpointError(
        f"weights {path} are a pretraining run's whole model: fine-tune from the part your "
        f"model takes, model.weights={export}/<retrieval|vcr|encoder|captioner>.safetensors "
        f"(written at the end of pretraining, or by `python recipes/pretrain.py --config "
        f"{path.parent / CONFIG_FILE} --eval-only model.weights={path.parent}`)"
    )
