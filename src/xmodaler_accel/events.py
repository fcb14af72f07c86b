"""Event bus: hooks are plain callables `fn(engine)` subscribed to events, with filters.

Filters look at the engine's own counters (the optimizer step for step events, the epoch for epoch
events), not at a count of calls, so they behave the same after a resume.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Event(str, enum.Enum):
    TRAIN_START = "train_start"
    EPOCH_START = "epoch_start"
    STEP_START = "step_start"
    STEP_END = "step_end"
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
        self._names: set[str] = set()
        self._owner_names: dict[int, str] = {}

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
        """Subscribed objects that have `state_dict`/`load_state_dict`, by unique name."""
        found: dict[str, Any] = {}
        seen: set[int] = set()
        for sub in self.subscriptions():
            owner = getattr(sub.fn, "__self__", sub.fn)
            if id(owner) in seen or not hasattr(owner, "state_dict"):
                continue
            if hasattr(owner, "load_state_dict"):
                seen.add(id(owner))
                found[sub.name] = owner
        return found

    def _name_for(self, fn: Callable, name: str | None) -> str:
        """Explicit names are made unique; one object keeps one name across its subscriptions."""
        owner = getattr(fn, "__self__", fn)
        if name is None and id(owner) in self._owner_names:
            return self._owner_names[id(owner)]
        unique = self._unique_name(name or _default_name(fn))
        self._owner_names.setdefault(id(owner), unique)
        return unique

    def _unique_name(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}#{i}"
        self._names.add(name)
        return name


def _default_name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return type(owner).__name__
    return getattr(fn, "__qualname__", None) or type(fn).__name__
