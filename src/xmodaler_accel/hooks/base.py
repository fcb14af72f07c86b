"""X-modaler's (detectron2's) hook interface over an Engine: `HookBase`, `self.trainer`,
`register_hooks`.

Our hooks are plain callables subscribed to events. `HookBase` exists so that a hook class written
for X-modaler or detectron2 (`before_train/after_train/before_step/after_step`, `self.trainer`)
plugs into an Engine unchanged, and `register_hooks(engine, hooks)` takes a hook list written as
X-modaler's `DefaultTrainer.build_hooks` writes it: our hook classes accept X-modaler's
constructor arguments, and `None` entries are skipped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..events import Event, is_stateful
from .storage import EventStorage


class HookBase:
    """X-modaler's hook interface. `self.trainer` (a `TrainerView`) is set when registered."""

    trainer: Any = None

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def state_dict(self) -> dict:
        """Stateless by default; a hook that also defines `load_state_dict` is checkpointed."""
        return {}


class TrainerView:
    """What an X-modaler hook sees as `self.trainer`: X-modaler's names over an Engine.

    `iter` is X-modaler's: the 0-based index of the step being run, the same in `before_step`
    and in `after_step` (where `engine.step`, the count of steps done, is already one more); in
    `before_train` it is `start_iter` (the step the run starts from, after a resume too); in
    `after_train` `max_iter` when training finished (X-modaler's `self.iter += 1` after its loop),
    the step that raised when it failed. `cfg` is the
    Engine's config, `iters_per_epoch` its optimizer steps per epoch, `storage` an EventStorage;
    everything else falls through to the Engine (`model`, `optimizer`, `scheduler`, ...), and
    attributes a hook sets (`self.trainer.ss_prob = p`) are set on the Engine. One per Engine:
    `trainer_view(engine)`.
    """

    _OWN = ("_engine", "_index", "start_iter", "storage")

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._index: int | None = None  # the step being run, from its STEP_START on
        self.start_iter = engine.step
        self.storage = EventStorage(self)
        engine.on(Event.TRAIN_START, self._start_training, name="TrainerView")
        engine.on(Event.STEP_START, self._start_step, name="TrainerView")
        engine.on(Event.TRAIN_END, self._finish_training, name="TrainerView")

    def _start_training(self, engine: Any) -> None:
        self._index, self.start_iter = None, engine.step
        self.storage.activate()

    def _start_step(self, engine: Any) -> None:
        self._index = engine.step

    def _finish_training(self, engine: Any) -> None:
        self._index = None  # iter is then the steps done: max_iter

    @property
    def iter(self) -> int:
        return self._engine.step if self._index is None else self._index

    @property
    def max_iter(self) -> int:
        return self._engine.max_steps

    @property
    def cfg(self) -> Any:
        return self._engine.config

    @property
    def iters_per_epoch(self) -> int:
        """Optimizer steps per epoch (batches per process over gradient accumulation)."""
        return self._engine.steps_per_epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)


_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trainer_view(engine: Any) -> TrainerView:
    """The Engine's one TrainerView (X-modaler's `trainer`), made on first use."""
    view = _views.get(engine)
    if view is None:
        view = _views[engine] = TrainerView(engine)
    return view


class _HookAdapter:
    """Calls one HookBase's methods on events; `after_train` also when training raises."""

    def __init__(self, hook: HookBase) -> None:
        self.hook = hook
        self._trained = False  # after_train already called in this run

    def __repr__(self) -> str:
        return f"{type(self.hook).__name__} at {id(self.hook):#x} (register_hooks)"

    def before_train(self, engine: Any) -> None:
        self._trained = False
        self.hook.before_train()

    def before_step(self, engine: Any) -> None:
        self.hook.before_step()

    def after_step(self, engine: Any) -> None:
        self.hook.after_step()

    def after_train(self, engine: Any) -> None:
        if not self._trained:  # once, as X-modaler's `finally:` (not again if it raised)
            self._trained = True
            self.hook.after_train()


class _StatefulHookAdapter(_HookAdapter):
    """The adapter of a hook with `state_dict`/`load_state_dict`: carries its state into
    checkpoints, under the name it was registered with."""

    def state_dict(self) -> dict:
        return self.hook.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.hook.load_state_dict(state)


def register_hooks(
    engine: Any, hooks: Iterable[Any | None], names: Iterable[str | None] | None = None
) -> None:
    """Attach hooks in order, as X-modaler's `TrainerBase.register_hooks` does; `None` entries
    are skipped (X-modaler's lists hold them). Our hook classes (with `attach`) attach themselves;
    other hooks are X-modaler `HookBase`s, called at TRAIN_START, STEP_START, STEP_END and at
    TRAIN_END or, when training raises, at EXCEPTION.

    `names` (one per entry; default: each hook's own) key the states of hooks that have
    `state_dict`/`load_state_dict` in checkpoints, so two such hooks of one class need names.
    """
    hooks = list(hooks)
    names = [None] * len(hooks) if names is None else list(names)
    if len(names) != len(hooks):
        raise ValueError(f"register_hooks: {len(hooks)} hooks but {len(names)} names")
    view = trainer_view(engine)
    for hook, name in zip(hooks, names):
        if hook is None:
            continue
        if hasattr(hook, "attach"):
            if name:
                hook.attach(engine, name=name)
            else:
                hook.attach(engine)
            continue
        name = name or type(hook).__name__
        hook.trainer = view
        adapter = (_StatefulHookAdapter if is_stateful(hook) else _HookAdapter)(hook)
        # The adapter first: a name clash then leaves nothing of this hook subscribed.
        engine.on(Event.STEP_START, adapter.before_step, name=name)
        engine.on(Event.STEP_END, adapter.after_step, name=name)
        engine.on(Event.TRAIN_START, adapter.before_train, name=name)
        engine.on(Event.TRAIN_END, adapter.after_train, name=name)
        engine.on(Event.EXCEPTION, adapter.after_train, name=name)


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
