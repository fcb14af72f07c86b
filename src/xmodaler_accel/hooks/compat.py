"""Constructors that take either our arguments or X-modaler's.

Where X-modaler's signature and ours put different things in one position (`EvalHook`,
`PeriodicCheckpointer`, `PreciseBN`), the hook takes `*args, **kwargs` and binds them to one of
two signature stubs, chosen by what was passed; a mismatch names both signatures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def bind_either(
    hook: str,
    args: tuple,
    kwargs: dict[str, Any],
    ours: Callable[..., None],
    xmodaler: Callable[..., None],
    use_xmodaler: bool,
) -> dict[str, Any]:
    """Bind `args, kwargs` to the `xmodaler` stub or the `ours` stub (defaults applied)."""
    stub = xmodaler if use_xmodaler else ours
    try:
        bound = inspect.signature(stub).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"{hook}{inspect.signature(stub)}: {err} (ours: {hook}{inspect.signature(ours)}; "
            f"X-modaler's: {hook}{inspect.signature(xmodaler)})"
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def first_argument(args: tuple, kwargs: dict[str, Any], name: str, index: int = 0) -> Any:
    """The argument at position `index` or named `name`; None when not given."""
    return args[index] if len(args) > index else kwargs.get(name)


def flatten_results(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"a": {"b": 1}}` -> `{"a/b": 1.0}`, as X-modaler's `flatten_results_dict`."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten_results(value, f"{prefix}{key}/"))
        else:
            try:
                flat[f"{prefix}{key}"] = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    "EvalHook: eval_function should return a nested dict of float; "
                    f"got {prefix}{key}: {value!r}"
                ) from err
    return flat
