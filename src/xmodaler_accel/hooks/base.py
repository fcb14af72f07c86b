"""Adapters for detectron2/X-modaler style hook classes and plain callbacks.

Our hooks are plain callables subscribed to events. `HookBase` exists so that a hook class written
for X-modaler or detectron2 (`before_train/after_train/before_step/after_step`, `self.trainer`)
plugs into an Engine unchanged: `register_hooks(engine, [MyHook()])`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..events import Event, is_stateful


class HookBase:
    """The seed's hook interface. `self.trainer` is set when the hook is registered."""

    trainer: Any = None

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...


class _Storage:
    """The part of detectron2's EventStorage that hooks use: scalars land in `engine.scalars`."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    @property
    def iter(self) -> int:
        return self._engine.step

    def put_scalar(self, name: str, value: float, smoothing_hint: bool = True) -> None:
        self._engine.scalars[name] = float(value)

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs: float) -> None:
        for name, value in kwargs.items():
            self.put_scalar(name, value)


class TrainerView:
    """What a seed hook sees as `self.trainer`: detectron2's names over an Engine.

    `iter` is 0-based as in detectron2: the index of the step being run, in `before_step` and in
    `after_step` alike. Everything else falls through to the Engine (`model`, `optimizer`, ...).
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.storage = _Storage(engine)
        self.start_iter = engine.step
        self.in_step = False

    @property
    def iter(self) -> int:
        return self._engine.step if self.in_step else max(self._engine.step - 1, 0)

    @property
    def max_iter(self) -> int:
        return self._engine.max_steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _HookAdapter:
    """Calls one HookBase's methods on events."""

    def __init__(self, hook: HookBase, view: TrainerView) -> None:
        self.hook, self.view = hook, view

    def __repr__(self) -> str:
        return f"{type(self.hook).__name__} at {id(self.hook):#x} (register_hooks)"

    def before_step(self, engine: Any) -> None:
        self.view.in_step = True
        self.hook.before_step()

    def after_step(self, engine: Any) -> None:
        self.view.in_step = False
        self.hook.after_step()


class _StatefulHookAdapter(_HookAdapter):
    """The adapter of a hook with `state_dict`/`load_state_dict`: carries its state into
    checkpoints, under the name it was registered with."""

    def state_dict(self) -> dict:
        return self.hook.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.hook.load_state_dict(state)


def register_hooks(
    engine: Any, hooks: Iterable[HookBase], names: Iterable[str] | None = None
) -> None:
    """Attach seed-style hooks in order, as detectron2's `TrainerBase.register_hooks` does.

    `names` (one per hook; default: the class names) key the states of hooks that have
    `state_dict`/`load_state_dict` in checkpoints, so two such hooks of one class need names.
    """
    hooks = list(hooks)
    names = [type(h).__name__ for h in hooks] if names is None else list(names)
    if len(names) != len(hooks):
        raise ValueError(f"register_hooks: {len(hooks)} hooks but {len(names)} names")
    view = TrainerView(engine)
    for hook, name in zip(hooks, names):
        hook.trainer = view
        adapter = (_StatefulHookAdapter if is_stateful(hook) else _HookAdapter)(hook, view)
        # The adapter first: a name clash then leaves nothing of this hook subscribed.
        engine.on(Event.STEP_START, adapter.before_step, name=name)
        engine.on(Event.STEP_END, adapter.after_step, name=name)
        engine.on(Event.TRAIN_START, lambda e, h=hook: h.before_train(), name=f"{name}.start")
        engine.on(Event.TRAIN_END, lambda e, h=hook: h.after_train(), name=f"{name}.end")


class CallbackHook(HookBase):
    """A hook made of plain functions `fn(trainer)`, as in detectron2."""

    def __init__(
        self,
        *,
        before_train: Callable | None = None,
        after_train: Callable | None = None,
        before_step: Callable | None = None,
        after_step: Callable | None = None,
    ) -> None:
        self._before_train, self._after_train = before_train, after_train
        self._before_step, self._after_step = before_step, after_step

    def before_train(self) -> None:
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self) -> None:
        if self._after_train:
            self._after_train(self.trainer)

    def before_step(self) -> None:
        if self._before_step:
            self._before_step(self.trainer)

    def after_step(self) -> None:
        if self._after_step:
            self._after_step(self.trainer)
