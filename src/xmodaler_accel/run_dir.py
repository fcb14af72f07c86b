"""An output directory holds one run: a new run never writes into another's, and `--resume`
continues only the run that the config describes.

Both checks run before anything is written, so a refused command leaves the directory as it was.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import find_resume_checkpoint, read_checkpoint_config
from .config import ConfigError, flatten

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"

# What a resumed run may change: how long it runs, how it is evaluated, logged and checkpointed,
# where it runs (precision, workers) and the weights it started from (the checkpoint replaces
# them). Anything else would make the resumed run a different experiment.
RESUME_MAY_CHANGE = (
    "output_dir",
    "mixed_precision",
    "model.weights",
    "train.max_steps",
    "train.epochs",
    "train.num_workers",
    "train.log_every",
    "train.timer_warmup",
    "eval",
    "checkpoint.every",
    "checkpoint.every_epochs",
    "checkpoint.keep",
    "logging",
)

# Files a run writes at its top level; --overwrite deletes a directory only if it holds one.
ABSENT = object()  # a key one of the two configs does not have

RUN_MARKERS = ("config.yaml", "log.txt", "metrics.jsonl", CHECKPOINT_SUBDIR)


def check_new_run_dir(output_dir: Path, overwrite: bool) -> None:
    """A new run needs an output_dir without results of another run, or `--overwrite`.

    A directory left by an attempt that stopped before its first logged step (a config or data
    error: only `config.yaml`, `log.txt`, an empty `metrics.jsonl`) holds no results: reused."""
    results = run_results(output_dir)
    if not results:
        return
    if overwrite:
        if not any((output_dir / marker).exists() for marker in RUN_MARKERS):
            raise ConfigError(
                f"--overwrite: {output_dir} does not look like a run directory (no "
                f"{', '.join(RUN_MARKERS)}); not deleting it: choose another output_dir"
            )
        return
    raise ConfigError(
        f"output_dir {output_dir} already holds a run ({', '.join(results[:5])}): add --resume "
        "to continue it, --overwrite to delete it and start again, or set output_dir=<new dir>"
    )


def run_results(output_dir: Path) -> list[str]:
    """Names of what in `output_dir` a run produced beyond its start-up files."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in sorted(output_dir.iterdir()):
        empty = (path.is_dir() and not any(path.iterdir())) or (
            path.is_file() and path.stat().st_size == 0
        )
        if path.name in ("config.yaml", "log.txt") or empty:
            continue
        found.append(path.name + ("/" if path.is_dir() else ""))
    return found


def clear_run_dir(output_dir: Path) -> None:
    """Delete a previous run's contents (`--overwrite`); checked by `check_new_run_dir` first."""
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("--overwrite: deleted the previous run in %s", output_dir)


def resume_checkpoint(cfg: Mapping[str, Any], evaluate_only: bool = False) -> Path | None:
    """The checkpoint `--resume` will continue from (newest intact one), after checking that it
    was written with this config, up to `RESUME_MAY_CHANGE`; None when there is none yet. To
    only evaluate it (`--eval-only --resume`) just the model and data must match."""
    root = Path(cfg["output_dir"]) / CHECKPOINT_SUBDIR
    path = find_resume_checkpoint(root, cfg["checkpoint"]["prefix"])
    if path is None:
        return None
    saved = read_checkpoint_config(path)
    if saved is None:
        logger.warning("checkpoint %s holds no config.yaml: cannot check the resumed config", path)
        return path
    changed = config_differences(saved, cfg)
    if evaluate_only:
        changed = [c for c in changed if c[0].split(".", 1)[0] in ("model", "data")]
    if changed:
        lines = "; ".join(
            f"{key}: {_show(old)} in the checkpoint, {_show(new)} now" for key, old, new in changed
        )
        raise ConfigError(
            f"--resume: checkpoint {path} was written with a different config ({lines}). "
            f"Resume with its settings ({path / 'config.yaml'}), or start a new run with "
            f"output_dir=<new dir> model.weights={path} to train on from its weights"
        )
    return path


def config_differences(saved: Mapping, now: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every leaf that differs, outside RESUME_MAY_CHANGE."""
    old, new = _flat(saved), _flat(now)
    changed = []
    for key in sorted(old.keys() | new.keys()):
        if _may_change(key):
            continue
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b:
            changed.append((key, a, b))
    return changed


def _may_change(key: str) -> bool:
    """In RESUME_MAY_CHANGE, directly or as a recipe section's copy (`scst.train.max_steps`)."""
    candidates = (key, key.split(".", 1)[-1])
    return any(c == k or c.startswith(f"{k}.") for c in candidates for k in RESUME_MAY_CHANGE)


def _flat(node: Mapping) -> dict[str, Any]:
    """Dotted leaves, tuples as lists (a config saved as YAML holds lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(node).items()}


def _show(value: Any) -> str:
    return "absent" if value is ABSENT else repr(value)
