"""Event bus: hooks are plain callables `fn(engine)` subscribed to events, with filters.

Filters look at the engine's own counters (the optimizer step for step events, the epoch for epoch
events), not at a count of calls, so they behave the same after a resume.

Every subscription has a name. A stateful hook's name (given at attach time, the class name by
default) keys its state in checkpoints, so two stateful hooks may not share one.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class Event(str, enum.Enum):
    TRAIN_START = "train_start"
    EPOCH_START = "epoch_start"
    STEP_START = "step_start"
    STEP_END = "step_end"
    LOG = "log"  # after every STEP_END hook: writers read what those hooks measured
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    TRAIN_END = "train_end"
    EXCEPTION = "exception"


def event_count(event: Event, engine: Any) -> int:
    """The number filters compare against: the step being run or just finished, or the epoch (1-based)."""
    if event is Event.EPOCH_START:
        return engine.epoch + 1
    if event is Event.STEP_START:
        return engine.step + 1
    return engine.step


@dataclass
class Subscription:
    event: Event
    fn: Callable[[Any], Any]
    name: str
    every: int | None = None
    once: int | None = None
    after: int | None = None
    before: int | None = None

    def wants(self, count: int) -> bool:
        if self.every is not None and (self.every <= 0 or count % self.every != 0):
            return False
        if self.once is not None and count != self.once:
            return False
        if self.after is not None and count <= self.after:
            return False
        return not (self.before is not None and count >= self.before)


class EventBus:
    """Ordered subscriptions per event. `on` is usable directly or as a decorator."""

    def __init__(self) -> None:
        self._subs: dict[Event, list[Subscription]] = {e: [] for e in Event}
        self._owners: dict[str, Any] = {}  # name -> the object subscribed under it
        self._owner_names: dict[int, str] = {}  # id(owner) -> its first name
        self._unloaded: dict[str, Any] = {}  # saved states whose hooks have not subscribed yet

    def on(
        self,
        event: Event,
        fn: Callable[[Any], Any] | None = None,
        *,
        every: int | None = None,
        once: int | None = None,
        after: int | None = None,
        before: int | None = None,
        name: str | None = None,
    ):
        """Subscribe `fn` to `event`; runs when the event's count passes every given filter.

        `every=N`: counts divisible by N (N <= 0 never fires, so `every=cfg.eval.every` with 0
        disables a hook); `once=N`: only at N; `after=N`: counts > N; `before=N`: counts < N.
        """
        if fn is None:
            return lambda f: self.on(
                event, f, every=every, once=once, after=after, before=before, name=name
            )
        sub = Subscription(Event(event), fn, name=self._name_for(fn, name))
        sub.every, sub.once, sub.after, sub.before = every, once, after, before
        self._subs[sub.event].append(sub)
        return fn

    def fire(self, event: Event, engine: Any) -> None:
        count = event_count(event, engine)
        for sub in list(self._subs[event]):
            if sub.wants(count):
                sub.fn(engine)

    def subscriptions(self) -> list[Subscription]:
        return [s for subs in self._subs.values() for s in subs]

    def stateful(self) -> dict[str, Any]:
        """Subscribed objects that have `state_dict`/`load_state_dict`, by their names: the keys
        of their states in a checkpoint."""
        return {name: owner for name, owner in self._owners.items() if is_stateful(owner)}

    def state_dicts(self) -> dict[str, Any]:
        """The states of the stateful hooks, by name, for a checkpoint."""
        return {name: owner.state_dict() for name, owner in self.stateful().items()}

    def load_states(self, states: dict[str, Any]) -> None:
        """Give saved states ({name: state}) to the stateful hooks subscribed by now; the others
        wait for `load_pending_states` (hooks may subscribe after a resume)."""
        self._unloaded = dict(states)
        self.load_pending_states()

    def load_pending_states(self, *, warn_unused: bool = False) -> None:
        """Give waiting states to the hooks subscribed since; `warn_unused`: log the others."""
        stateful = self.stateful()
        for name in [n for n in self._unloaded if n in stateful]:
            stateful[name].load_state_dict(self._unloaded.pop(name))
        for name in self._unloaded if warn_unused else ():
            logger.warning("checkpoint holds state for hook %r, which is not subscribed", name)

    def _name_for(self, fn: Callable, name: str | None) -> str:
        """The subscription's name. A stateful object's name keys its checkpoint state, so it is
        its own (reordering hooks cannot swap states): a name taken by another object is an error.
        Other callables get `#2`, `#3` ... suffixes; an object keeps its first name by default."""
        owner = getattr(fn, "__self__", fn)
        known = self._owner_names.get(id(owner))
        name = name or known or _default_name(fn)
        holder = self._owners.get(name, owner)
        if is_stateful(owner):
            if holder is not owner:
                raise ValueError(_name_clash(name, holder, owner))
            if known is not None and known != name:
                raise ValueError(f"{_describe(owner)} is subscribed as {known!r}, not {name!r}")
        elif holder is not owner:
            name = self._unique_name(name)
        self._owners[name] = owner
        self._owner_names.setdefault(id(owner), name)
        return name

    def _unique_name(self, base: str) -> str:
        name, i = base, 1
        while name in self._owners:
            i += 1
            name = f"{base}#{i}"
        return name


def is_stateful(obj: Any) -> bool:
    """Whether `obj` saves state into checkpoints (`state_dict` and `load_state_dict`)."""
    return hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")


def _describe(obj: Any) -> str:
    if type(obj).__repr__ is not object.__repr__:  # e.g. an adapter that names what it wraps
        return repr(obj)
    return f"{type(obj).__name__} at {id(obj):#x}"


def _name_clash(name: str, holder: Any, owner: Any) -> str:
    return (
        f"two hooks named {name!r}: {_describe(holder)} and {_describe(owner)}. A stateful "
        "hook's state is saved in checkpoints under its name, so pass a distinct name= to "
        "attach(engine, name=...) (or engine.on(..., name=...), register_hooks(..., names=...))"
    )


def _default_name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return type(owner).__name__
    return getattr(fn, "__qualname__", None) or type(fn).__name__
