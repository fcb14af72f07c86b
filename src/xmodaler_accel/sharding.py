"""What differs between Accelerate's engines, in one place: DDP (or one process), FSDP (FSDP2;
FSDP1 on GPUs), DeepSpeed ZeRO-1/2/3 and `torch.compile`. The rest of the library is engine-blind:

- `model_state` / `optimizer_state` and their `load_*`: the model and optimizer as whole state
  dicts under parameter names (a DDP, FSDP or compiled checkpoint resumes under any of them),
  through Accelerate's `get_state_dict` and PyTorch's distributed state-dict API (DeepSpeed's
  partitioned optimizer stays DeepSpeed's: `checkpoint` gives it its own folder).
- `gathered`: the unwrapped model with every parameter present on every process, for code that
  calls the model outside the wrapper's forward (generation, evaluation, EMA, exports).
- `check_engine_settings`: settings an engine cannot honour are errors at start.
- `fsdp_on_cpu`: Accelerate drops FSDP on a machine without GPUs; FSDP2 runs there on gloo.
- `same_initial_weights`: every process starts from rank 0's initialisation, as under DDP.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.utils import DistributedType

from .config import ConfigError

COMPILED_PREFIX = "_orig_mod."


def engine_name(accelerator: Any) -> str:
    """One of DDP, FSDP2, FSDP1, DeepSpeed ZeRO-<stage>, one process."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{_zero_stage(accelerator)}"
    return "DDP" if accelerator.num_processes > 1 else "one process"


def _zero_stage(accelerator: Any) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def is_fsdp(accelerator: Any) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Any) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---------------------------------------------------------------- settings
def check_engine_settings(cfg: Any, accelerator: Any) -> None:
    """ConfigError naming the key and the engine for what the engine cannot do."""
    if not (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        return  # DDP and one process do all a config can ask
    engine = engine_name(accelerator)
    if cfg.train.clip_grad.mode == "value":
        raise ConfigError(
            f"config key 'train.clip_grad.mode' is 'value', which {engine} cannot do (Accelerate "
            "clips by value under DDP or one process only): use train.clip_grad.mode=norm"
        )
    if is_fsdp(accelerator):
        _check_fsdp(accelerator.state.fsdp_plugin)
    if is_deepspeed(accelerator):
        _check_deepspeed(cfg, accelerator, engine)


def _check_fsdp(plugin: Any) -> None:
    from torch.distributed.fsdp import StateDictType

    if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        raise ConfigError(
            f"FSDP setting fsdp_state_dict_type is {plugin.state_dict_type.name}: checkpoints "
            "here hold full state dicts, read with weights_only (torch.distributed.checkpoint's "
            "sharded format unpickles its metadata) and resumable under any engine; answer "
            "FULL_STATE_DICT in `accelerate config` (or FSDP_STATE_DICT_TYPE=FULL_STATE_DICT)"
        )


def _check_deepspeed(cfg: Any, accelerator: Any, engine: str) -> None:
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = float(cfg.train.clip_grad.max) if cfg.train.clip_grad.mode == "norm" else 0.0
    if ds_config.get("gradient_clipping") == "auto":  # "auto": the script's value (else 1.0)
        ds_config["gradient_clipping"] = ours
    ds_clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
    if ds_clip != ours:
        raise ConfigError(
            f"config key 'train.clip_grad' asks for {ours or 'no'} gradient-norm clipping but "
            f"{engine} clips at its own gradient_clipping={ds_clip} (DeepSpeed clips inside "
            "its step): make them agree (`accelerate config` or the DeepSpeed JSON)"
        )
    if _zero_stage(accelerator) == 3 and cfg.train.get("ema_decay", 0) > 0:
        raise ConfigError(
            f"config key 'train.ema_decay' needs every weight on every process after each step; "
            f"{engine} partitions them: use ZeRO-2 or FSDP2, or train.ema_decay=0"
        )
    if _zero_stage(accelerator) == 3 and not ds_config.get("zero_optimization", {}).get(
        "stage3_gather_16bit_weights_on_model_save", False
    ):
        raise ConfigError(
            f"{engine}: checkpoints and exports need the gathered weights: answer yes to "
            "zero3_save_16bit_model in `accelerate config` "
            "(stage3_gather_16bit_weights_on_model_save: true)"
        )


# ---------------------------------------------------------------- FSDP on CPU
def wants_fsdp(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_cpu_engine(env: Mapping[str, str] | None = None) -> None:
    """On a machine without CUDA: FSDP2 can run (gloo), FSDP1 and DeepSpeed cannot."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "the launcher asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED), which needs GPUs; "
            "on this machine use FSDP (fsdp_version: 2) or DDP"
        )
    if wants_fsdp(env) and env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "the launcher asks for FSDP version 1 (FSDP_VERSION), which needs GPUs; on a "
            "machine without them answer fsdp_version: 2 in `accelerate config`"
        )


def fsdp_on_cpu(accelerator: Any, mixed_precision: str) -> None:
    """Turn a gloo CPU Accelerator into an FSDP2 one, as Accelerate would on GPUs: its state
    selects FSDP only for GPU backends and would silently train with DDP instead."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def same_initial_weights(accelerator: Any, model: torch.nn.Module) -> None:
    """Every process starts from the main process's weights (collective). DDP broadcasts them
    itself; FSDP keeps each process's own shard of whatever model it was given, and processes
    seeded apart (`seed + rank`) initialise differently."""
    if accelerator.num_processes == 1 or not (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            moved = tensor.detach().to(accelerator.device)
            torch.distributed.broadcast(moved, src=0)
            tensor.copy_(moved)


# ---------------------------------------------------------------- state dicts
def strip_compiled(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without torch.compile's `_orig_mod.` (a compiled model's own names)."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}


def model_state(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on the main process (collective: FSDP and ZeRO-3 gather)."""
    state = accelerator.get_state_dict(model)
    return strip_compiled(state) if accelerator.is_main_process else {}


def whole_weights(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model_state` under every name of each tied weight, ready for a plain copy's
    `load_state_dict` (main process; collective)."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    state = model_state(accelerator, model)
    return with_tied_copies(state, unwrapped) if accelerator.is_main_process else {}


def optimizer_state(accelerator: Any, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The full optimizer state dict, keyed by parameter names (PyTorch's distributed state-dict
    API, as Accelerate's FSDP save uses it), on the main process (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = get_optimizer_state_dict(_stateful(accelerator, model), inner, options=options)
    return state if accelerator.is_main_process else {}


def load_model_state(
    accelerator: Any, model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> None:
    """Load a full state dict (every process holds it) into the prepared model, strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(_stateful(accelerator, model), dict(state), options=options)


def load_optimizer_state(
    accelerator: Any, model: torch.nn.Module, optimizer: Any, state: Mapping[str, Any]
) -> None:
    """Load what `optimizer_state` returned (every process holds it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(_stateful(accelerator, model), inner, dict(state), options=options)


def _stateful(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The module PyTorch's state-dict API is given: FSDP1's wrapper (it owns the flat
    parameters), else the model without DDP and torch.compile wrappers (FSDP2 shards in place)."""
    if is_fsdp(accelerator) and not accelerator.is_fsdp2:
        return model
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# ---------------------------------------------------------------- whole parameters
_GATHERED: set[int] = set()  # models inside `gathered` now (it is re-entrant)


@contextlib.contextmanager
def gathered(accelerator: Any, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The unwrapped model with all its parameters on every process for the duration
    (collective: every process enters it; re-entrant). Read-only: what it changes in the
    parameters is lost under FSDP and ZeRO-3 when it exits; buffers (BatchNorm statistics) stay."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if id(unwrapped) in _GATHERED:
        yield unwrapped
        return
    _GATHERED.add(id(unwrapped))
    try:
        with _gathering(accelerator, model, unwrapped):
            yield unwrapped
    finally:
        _GATHERED.discard(id(unwrapped))


@contextlib.contextmanager
def _gathering(accelerator: Any, model: torch.nn.Module, unwrapped: torch.nn.Module):
    if is_fsdp(accelerator) and accelerator.is_fsdp2:
        with _fsdp2_unsharded(unwrapped, accelerator.state.fsdp_plugin):
            yield
    elif is_fsdp(accelerator):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield
    elif is_deepspeed(accelerator) and _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def _fsdp2_unsharded(model: torch.nn.Module, plugin: Any) -> Iterator[None]:
    """Every FSDP2 module unsharded, and kept so through forwards: a forward that resharded would
    all-gather again, a collective that processes decoding different batches would not share."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(bool(plugin.reshard_after_forward), recurse=False)


# ---------------------------------------------------------------- sharded tensors
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) as its whole value (collective); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shaped_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference`: this process's shard when `reference` is a DTensor."""
    if not hasattr(reference, "device_mesh"):
        return full.to(reference.device)
    from torch.distributed.tensor import distribute_tensor

    full = full.to(reference.device_mesh.device_type)
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)


# ---------------------------------------------------------------- tied weights
def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied weights), each sorted."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name.replace(COMPILED_PREFIX, ""))
    return [sorted(names) for names in groups.values() if len(names) > 1]


def without_tied_copies(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """`state` with each tied tensor under its first name only, as safetensors' `save_model`
    writes it (a file cannot hold one tensor twice)."""
    drop = {name for group in tied_names(model) for name in group[1:]}
    return {k: v for k, v in state.items() if k not in drop}


def with_tied_copies(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """`state` with every name of a tied tensor, whichever one the file kept."""
    state = dict(state)
    for group in tied_names(model):
        present = [name for name in group if name in state]
        for name in group if present else []:
            state.setdefault(name, state[present[0]])
    return state
