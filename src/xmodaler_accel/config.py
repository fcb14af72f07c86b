"""YAML configs with `_base_` includes, typed dotted overrides and errors that name the key at fault.

The library's `DEFAULTS` are the schema of the keys every recipe understands. A root YAML file (one
without `_base_`) may add new sections and keys (the model, data and task sections of a recipe);
a file with a `_base_`, and every command-line override, may only set keys that already exist,
so a typo is an error that suggests the nearest valid keys instead of a silently ignored setting.

A value may refer to another key: `model_size: ${model.transformer.d_model}`. References are
resolved once the `_base_` chain, a recipe's section (`scst:`) and the command-line overrides are
applied, so overriding the target changes every value that refers to it; a resolved config holds
plain values only. A whole-value reference takes the target's value and type (a number, a list, a
whole section); a reference inside a string (`output/${model.kind}_xe`) inserts a string, number
or boolean target as text. References name keys from the top (`train.batch_size`), may refer to
keys that refer on, and never back to themselves. `${` always starts a reference, and a YAML
flow mapping or list (`{...}`, `[...]`) needs the value quoted: `{model_size: "${a.b}"}`.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

BASE_KEY = "_base_"
# `${dotted.key}`: a reference to another key's value (see the module docstring).
REFERENCE = re.compile(r"\$\{([^${}]*)\}")
_DOTTED_KEY = re.compile(r"[\w-]+(\.[\w-]+)*")

DEFAULTS: dict[str, Any] = {
    "output_dir": "output/run",
    "seed": 42,
    # "no" | "fp16" | "bf16"; left null, the launcher's setting (`accelerate launch
    # --mixed_precision`, `accelerate config`) or "no". See setup.resolve_launcher_settings.
    "mixed_precision": None,
    "train": {
        # How long to train: optimizer steps, or epochs (X-modaler's SOLVER.EPOCH) that
        # setup.resolve_epochs turns into steps for the dataset, global batch and world size.
        "max_steps": None,
        "epochs": None,
        "batch_size": 32,  # per process
        "grad_accum": None,  # left null: the launcher's (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) or 1
        "num_workers": 0,
        "drop_last": True,
        "log_every": 20,
        # X-modaler clips gradients by value 0.1; "norm" clips the global L2 norm; "none" does not clip.
        "clip_grad": {"mode": "none", "max": 0.1},
        # Scale optim.lr linearly by (world_size * grad_accum) / reference_workers, as detectron2's
        # auto_scale_workers does for the reference world size a config was tuned for.
        "auto_scale_workers": False,
        "reference_workers": 1,
        "timer_warmup": 5,
    },
    "optim": {
        "name": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "momentum": 0.9,
    },
    "lr_scheduler": {
        # "constant" | "noam" | "warmup_linear" | "warmup_cosine" | "step" | "warmup_multistep"
        "name": "constant",
        "warmup_steps": 0,
        "model_size": 512,  # noam
        "factor": 1.0,  # noam
        "step_size": None,  # step: steps between decays
        "step_size_epochs": None,  # step: the same in epochs (X-modaler's StepLR STEP_SIZE)
        "gamma": 0.1,  # step, warmup_multistep
        "milestones": [],  # warmup_multistep: steps at which the rate is multiplied by gamma
        "min_lr_ratio": 0.0,  # cosine / linear floor
    },
    # Periods in steps (0: only at the end), or in epochs (`every_epochs`, resolve_epochs).
    "eval": {"batch_size": 64, "every": 0, "every_epochs": None, "start": 0},
    "checkpoint": {"every": 0, "every_epochs": None, "keep": 3, "prefix": "step"},
    "model": {"weights": ""},
    "logging": {
        # What a training log line shows (those the step reports); metrics.jsonl has them all.
        "console_fields": ["loss", "reward", "lr", "grad_norm", "time"],
        "tensorboard": False,
        # W&B logs when `project` is set. `mode` left null follows W&B: WANDB_MODE, else
        # `wandb offline`/`wandb online`, else online; set, it must agree with them (see
        # setup.resolve_wandb_mode). An empty entity/name leaves WANDB_ENTITY/WANDB_NAME to W&B.
        "wandb": {"project": "", "mode": None, "entity": "", "name": ""},
    },
}


# The values each enumerated key accepts; checked when a config is loaded, so a typo stops the run
# before data and model are built. Tasks add their own (e.g. captioning's `rl.sampler`).
CHOICES: dict[str, tuple[Any, ...]] = {
    "mixed_precision": (None, "no", "fp16", "bf16"),
    "train.clip_grad.mode": ("none", "norm", "value"),
    "optim.name": ("adam", "adamw", "sgd"),
    "lr_scheduler.name": (
        "constant",
        "noam",
        "warmup_linear",
        "warmup_cosine",
        "step",
        "warmup_multistep",
    ),
    "logging.wandb.mode": (None, "online", "offline", "disabled"),
}

# Keys whose default is null (unset): the type a value must have when one is given.
NULLABLE_TYPES: dict[str, type] = {
    "mixed_precision": str,
    "train.grad_accum": int,
    "train.max_steps": int,
    "train.epochs": int,
    "eval.every_epochs": int,
    "checkpoint.every_epochs": int,
    "lr_scheduler.step_size": int,
    "lr_scheduler.step_size_epochs": int,
}

# Sections of DEFAULTS that a root config file may extend with keys of its own.
OPEN_SECTIONS = frozenset({"model"})


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the file or key at fault."""


class Config(dict):
    """A nested dict with attribute access (`cfg.train.max_steps`)."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = Config(value) if isinstance(value, Mapping) else value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(_unknown_key_message(name, self.keys())) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = Config(value) if isinstance(value, Mapping) else value

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(copy.deepcopy(self.to_dict(), memo))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (what yaml.safe_dump and trackers accept)."""
        return {
            k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()
        }

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def load_config(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    sections: Iterable[str] = (),
    choices: Mapping[str, tuple[Any, ...]] | None = None,
    resolve: bool = True,
) -> Config:
    """Load `path` (with its `_base_` chain) over `defaults`, then apply `key=value` overrides,
    then resolve `${key}` references and check every enumerated key against `choices` (default
    `CHOICES`): `resolve_config`.

    `sections` names a recipe's own sections (e.g. `scst`): overrides of the other keys, which
    any file may fill; `apply_section` checks them against the config when it applies them.
    `resolve=False` returns the config before `resolve_config`, references and all: for a recipe
    that applies its section first (`apply_section`), then resolves.
    """
    defaults = DEFAULTS if defaults is None else defaults
    sections = frozenset(sections)
    merged = copy.deepcopy(dict(defaults))
    chain = _load_file_chain(Path(path), (), defaults, sections)
    _merge(merged, chain, str(path), strict=False, prefix="", sections=sections)
    cfg = Config(merged)
    apply_overrides(cfg, overrides)
    if not resolve:
        return cfg
    return resolve_config(cfg, defaults, choices, source=str(path))


def resolve_config(
    cfg: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, tuple[Any, ...]] | None = None,
    source: str = "",
) -> Config:
    """A copy of `cfg` with every `${key}` reference replaced by that key's value, each key of
    `defaults` (default `DEFAULTS`) type-checked again, and every enumerated key checked against
    `choices` (default `CHOICES`). Errors name the key, the reference and `source`."""
    resolver = _Resolver(cfg, source)
    plain = {key: resolver.value(key) for key in cfg}
    schema = DEFAULTS if defaults is None else defaults
    _check_types(plain, schema, "", source, resolver.references)
    resolved = Config(plain)
    check_choices(resolved, CHOICES if choices is None else choices, source=source)
    return resolved


class _UnknownKey(Exception):
    def __init__(self, dotted: str, valid: Iterable[str], prefix: str):
        super().__init__(dotted)
        self.dotted, self.valid, self.prefix = dotted, list(valid), prefix


class _Resolver:
    """Resolves the references of one config; `value(key)` is the key's value, references
    resolved (each key once). `references` maps each key that held one to its text."""

    def __init__(self, root: Mapping[str, Any], source: str):
        self.root, self.where = root, f"{source}: " if source else ""
        self.done: dict[str, Any] = {}
        self.references: dict[str, str] = {}

    def value(self, key: str, stack: tuple[str, ...] = (), text: str = "") -> Any:
        if key not in self.done:
            if key in stack:
                chain = " -> ".join((*stack[stack.index(key) :], key))
                raise ConfigError(
                    f"{self.where}config key '{stack[-1]}': {text or '${' + key + '}'} makes a "
                    f"cycle of references: {chain}"
                )
            stack = (*stack, key)
            self.done[key] = self._resolve(self._raw(key, stack), key, stack)
        return copy.deepcopy(self.done[key])

    def _raw(self, key: str, stack: tuple[str, ...]) -> Any:
        """The value stored at `key`, through any reference on the way (`${a}.b`)."""
        parts, node = key.split("."), self.root
        for i, part in enumerate(parts):
            if i and _whole_reference(node) is not None:
                node = self.value(".".join(parts[:i]), stack)
            if not isinstance(node, Mapping) or part not in node:
                prefix = ".".join(parts[:i]) + "." if i else ""
                raise _UnknownKey(key, node.keys() if isinstance(node, Mapping) else [], prefix)
            node = node[part]
        return node

    def _resolve(self, raw: Any, key: str, stack: tuple[str, ...], keyed: bool = True) -> Any:
        if isinstance(raw, Mapping):
            if keyed:  # each child under its own key (a reference to it resolves it once)
                return {k: self.value(f"{key}.{k}", stack) for k in raw}
            return {k: self._resolve(v, key, stack, keyed=False) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self._resolve(item, key, stack, keyed=False) for item in raw]
        if not isinstance(raw, str) or "${" not in raw:
            return copy.deepcopy(raw)
        self.references.setdefault(key, raw)
        whole = _whole_reference(raw)
        if whole is not None:
            return self._target(whole, raw, key, stack)
        pieces, end = [], 0
        for match in REFERENCE.finditer(raw):
            value = self._target(match.group(1), match.group(0), key, stack)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif not isinstance(value, (str, int, float)):
                raise ConfigError(
                    f"{self.where}config key '{key}': {match.group(0)} inside a string must "
                    f"name a string or a number, got {type(value).__name__} ({value!r})"
                )
            pieces += [raw[end : match.start()], str(value)]
            end = match.end()
        if "${" in (rest := "".join([*pieces[::2], raw[end:]])):
            raise ConfigError(
                f"{self.where}config key '{key}': cannot read the reference in {raw!r} "
                f"(near {rest[rest.index('${') :]!r}): write ${{dotted.key}}"
            )
        return "".join([*pieces, raw[end:]])

    def _target(self, target: str, text: str, key: str, stack: tuple[str, ...]) -> Any:
        target = target.strip()
        if not _DOTTED_KEY.fullmatch(target):
            raise ConfigError(
                f"{self.where}config key '{key}': {text} is not a reference to a key: write "
                "${dotted.key}, e.g. ${model.transformer.d_model}"
            )
        try:
            return self.value(target, stack, text)
        except _UnknownKey as miss:
            if miss.dotted != target:
                raise
            message = _unknown_key_message(target, miss.valid, miss.prefix, root=self.root)
            raise ConfigError(
                f"{self.where}config key '{key}': {text} refers to an {message}"
            ) from None


def _whole_reference(value: Any) -> str | None:
    """The key named by a value that is one reference and nothing else (`${a.b}`), else None."""
    if isinstance(value, str) and (match := REFERENCE.fullmatch(value.strip())):
        return match.group(1).strip()
    return None


def _check_types(
    plain: dict, schema: Mapping, prefix: str, source: str, references: Mapping[str, str]
) -> None:
    """Check (and convert, as `_check_type`) each value whose key `schema` defines, in place."""
    for key, value in plain.items():
        if key not in schema:
            continue
        dotted, expected = f"{prefix}{key}", schema[key]
        if isinstance(expected, Mapping) and isinstance(value, Mapping):
            _check_types(value, expected, f"{dotted}.", source, references)
            continue
        try:
            plain[key] = _check_type(dotted, expected, value, source or "config")
        except ConfigError as err:
            if dotted not in references:
                raise
            raise ConfigError(f"{err}, from {references[dotted]!r}") from None


def check_choices(cfg: Config, choices: Mapping[str, tuple[Any, ...]], source: str = "") -> None:
    """Raise ConfigError naming the first enumerated key whose value is not one of its choices."""
    for dotted, allowed in choices.items():
        try:
            value = cfg.get_path(dotted)
        except (KeyError, TypeError):
            continue  # a key this recipe's config does not have
        if value not in allowed:
            where = f"{source}: " if source else ""
            shown = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise ConfigError(f"{where}config key '{dotted}': {value!r} is not one of {shown}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _load_file_chain(
    path: Path, stack: tuple[Path, ...], defaults: Mapping, sections: frozenset[str]
) -> dict[str, Any]:
    """The file's settings with its `_base_` chain folded in (later bases win), validated.

    A file with bases may only set keys that its bases or the defaults define.
    """
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"cycle in {BASE_KEY} includes: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        _merge(copy.deepcopy(dict(defaults)), data, str(path), False, "", sections)
        return data
    settings: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} file not found: {base_path}")
        deep_update(settings, _load_file_chain(base_path, (*stack, path), defaults, sections))
    schema = copy.deepcopy(dict(defaults))
    _merge(schema, settings, str(path), False, "", sections)
    _merge(schema, data, str(path), True, "", sections)
    deep_update(settings, data)
    return settings


def deep_update(dst: dict, src: Mapping) -> None:
    """Merge nested `src` into `dst` in place: mappings key by key, anything else replaced."""
    for key, value in src.items():
        if isinstance(dst.get(key), dict) and isinstance(value, Mapping):
            deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _merge(
    dst: dict,
    src: Mapping,
    source: str,
    strict: bool,
    prefix: str,
    sections: frozenset[str] = frozenset(),
) -> None:
    """Merge `src` into `dst`, type-checking values against existing ones.

    `strict` forbids new keys (files with a `_base_`). A root file may add new top-level sections
    and keys inside `OPEN_SECTIONS`, but not near-misses of existing keys (`trian` for `train`),
    which are almost always typos.
    """
    for key, value in src.items():
        if not prefix and key in sections:  # checked when applied (apply_section)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: config key '{key}': expected a mapping of overrides")
            deep_update(dst.setdefault(key, {}), value)
            continue
        dotted = f"{prefix}{key}"
        if key not in dst:
            near = difflib.get_close_matches(key, list(dst), n=3, cutoff=0.75)
            if strict or near:
                raise ConfigError(f"{source}: {_unknown_key_message(dotted, dst.keys(), prefix)}")
            dst[key] = copy.deepcopy(value)
        elif isinstance(dst[key], dict) and isinstance(value, Mapping):
            child_strict = strict or (bool(dst[key]) and dotted not in OPEN_SECTIONS)
            _merge(dst[key], value, source, child_strict, f"{dotted}.")
        else:
            dst[key] = _check_type(dotted, dst[key], value, source)


def _check_type(dotted: str, current: Any, value: Any, source: str) -> Any:
    """Return `value` as the type of `current`, or raise naming key, expected and got.

    A value with a `${key}` reference, or a key that holds one, is checked once references are
    resolved (`resolve_config`)."""
    if value is None:
        return value
    if (isinstance(value, str) and "${" in value) or _whole_reference(current) is not None:
        return copy.deepcopy(value)
    if current is None:
        if dotted not in NULLABLE_TYPES:
            return value
        current = NULLABLE_TYPES[dotted]()  # a value of the type the key takes
    expected = type(current)
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, float) and isinstance(value, int):
        return float(value)
    elif isinstance(current, dict):
        ok = isinstance(value, Mapping)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{source}: config key '{dotted}': expected {expected.__name__}, "
            f"got {type(value).__name__} ({value!r})"
        )
    return copy.deepcopy(value)


def _unknown_key_message(
    dotted: str, valid: Iterable[str], prefix: str = "", root: Mapping | None = None
) -> str:
    """Name the unknown key, suggest the nearest valid ones and list the keys at that level.

    With `root` (the whole config) the suggestion compares full dotted keys, so a typo in any
    part is found (`trian.max_steps` -> 'train.max_steps', `optim.lr_typo` -> 'optim.lr')."""
    valid = list(valid)
    if root is not None:
        near = difflib.get_close_matches(dotted, _dotted_keys(root), n=3, cutoff=0.6)
    else:
        leaf = dotted.rsplit(".", 1)[-1]
        near = [prefix + n for n in difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)]
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown config key '{dotted}'{hint} (valid keys here: {', '.join(sorted(valid))})"


def flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"train.max_steps": 100, ...}`: every leaf of a nested mapping under its dotted key."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dotted_keys(node: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> None:
    """Apply `a.b=value` overrides in place; each value is parsed as YAML, typed by the old value."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                here = node.keys() if isinstance(node, dict) else []
                prefix = ".".join(parts[:i]) + "." if i else ""
                message = _unknown_key_message(dotted, here, prefix, root=cfg)
                raise ConfigError(f"override: {message}")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if _whole_reference(current) is not None:  # typed as the value it refers to
            current = _value_or(cfg, dotted, current)
        typed_as_string = isinstance(current, str) and _whole_reference(current) is None
        value = raw if typed_as_string else _parse_value(raw)
        checked = _check_type(dotted, current, value, "override")
        node[parts[-1]] = Config(checked) if isinstance(checked, Mapping) else checked


def _value_or(cfg: Config, dotted: str, default: Any) -> Any:
    """The value of `dotted` with references resolved, or `default` when they do not resolve
    (`resolve_config` reports that)."""
    try:
        return _Resolver(cfg, "").value(dotted)
    except (ConfigError, _UnknownKey):
        return default


def apply_section(cfg: Config, name: str, overrides: Iterable[str] = ()) -> Config:
    """A copy of `cfg` with its `name:` section (e.g. `scst:`) set over the keys it names, then the
    command-line `overrides` outside that section applied again: base YAML < section < command
    line. The section stays in the copy holding the values that won, so the saved config runs
    the same way again."""
    section = cfg.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config key '{name}': expected a mapping of overrides, got {section!r}")
    if name in section:
        raise ConfigError(f"config key '{name}.{name}': a section cannot override itself")
    merged = cfg.to_dict()  # to_dict copies: cfg stays as it was
    _merge(merged, section.to_dict(), f"section '{name}'", strict=True, prefix="")
    out = Config(merged)
    apply_overrides(out, [o for o in overrides if not o.split("=", 1)[0].startswith(f"{name}.")])
    _record_section(out, out[name])
    return out


def _record_section(resolved: Mapping, section: dict) -> None:
    """Write the values that won back into the section, so that applying it again is a no-op."""
    for key, value in section.items():
        if isinstance(value, dict):
            _record_section(resolved[key], value)
        else:
            section[key] = copy.deepcopy(resolved[key])


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(raw)
        except ValueError:
            return value
    return value


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (no `_base_`), loadable again with `load_config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_yaml(cfg))
    os.replace(tmp, path)


def config_yaml(cfg: Config) -> str:
    """The config as YAML text: what `save_config` writes and `--print-config` prints."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
