"""Atomic, exact-resume checkpoints, and weights-only loading.

Layout of `checkpoints/<prefix>_<step>/`: `model.safetensors`, `optimizer.pt`, `scheduler.pt`,
`scaler.pt` (fp16 only), `hooks.pt`, `rng_<rank>.pt` (one per process) and `trainer_state.json`.
Everything is written into `.tmp-<name>/` and renamed into place, so a directory without the `.tmp-`
prefix is complete. Every `.pt` file holds tensors and plain Python containers only and is read
with `torch.load(weights_only=True)`: loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
REQUIRED_FILES = (STATE_FILE, MODEL_FILE, "optimizer.pt", "hooks.pt")


class CheckpointError(RuntimeError):
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
) -> Path:
    """Write a complete checkpoint atomically; collective (every process must call it)."""
    root = Path(root)
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_torch(capture_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
        _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            _save_torch(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        _save_torch(hook_states, tmp / "hooks.pt")
        state = dict(trainer_state, world_size=accelerator.num_processes)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


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
    """Complete checkpoints under `root`, oldest first, as (step, path)."""
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found = []
    for path in root.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES):
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


# ---------------------------------------------------------------- reading
def read_checkpoint(
    accelerator: Any,
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer, scheduler, scaler and this process's RNG; return (state, hooks)."""
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = json.loads((path / STATE_FILE).read_text())
    # Read on the CPU and copied into the parameters where they live (safetensors rejects "cpu:0").
    load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), device="cpu")
    optimizer.load_state_dict(_load_torch(path / "optimizer.pt"))
    if scheduler is not None:
        _require(path / "scheduler.pt")
        scheduler.load_state_dict(_load_torch(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_torch(path / "scaler.pt"))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if state.get("world_size") != accelerator.num_processes or not rng_file.is_file():
        logger.warning(
            "checkpoint %s was written by %s processes, resuming with %s: the data order is "
            "kept, but random streams (dropout, sampling) are re-seeded per process",
            path,
            state.get("world_size"),
            accelerator.num_processes,
        )
    else:
        restore_rng_state(_load_torch(rng_file))
    return state, _load_torch(path / "hooks.pt")


def _require(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or an object that is not plain data
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
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    else:
        state = _load_torch(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if problems and strict:
        raise CheckpointError(f"weights {path} do not match the model; " + "; ".join(problems))
    for problem in problems:
        logger.warning("weights %s: %s", path, problem)
