"""Event bus filters and hook naming."""

from types import SimpleNamespace

import pytest

from xmodaler_accel.events import Event, EventBus


def fired_steps(bus, event, steps):
    engine = SimpleNamespace(step=0, epoch=0)
    seen = []
    for step in steps:
        engine.step = step
        before = len(bus.log)
        bus.fire(event, engine)
        if len(bus.log) > before:
            seen.append(step)
    return seen


def make_bus(**filters):
    bus = EventBus()
    bus.log = []
    bus.on(Event.STEP_END, lambda e: bus.log.append(e.step), **filters)
    return bus


def test_every_once_after_before():
    assert fired_steps(make_bus(every=3), Event.STEP_END, range(1, 11)) == [3, 6, 9]
    assert fired_steps(make_bus(once=4), Event.STEP_END, range(1, 11)) == [4]
    assert fired_steps(make_bus(after=7), Event.STEP_END, range(1, 11)) == [8, 9, 10]
    assert fired_steps(make_bus(every=2, after=4, before=9), Event.STEP_END, range(1, 11)) == [6, 8]
    assert fired_steps(make_bus(every=0), Event.STEP_END, range(1, 11)) == []


def test_step_start_counts_the_step_about_to_run():
    bus = EventBus()
    seen = []
    bus.on(Event.STEP_START, lambda e: seen.append(e.step), once=5)
    engine = SimpleNamespace(step=4, epoch=0)  # 4 steps done: step 5 starts
    bus.fire(Event.STEP_START, engine)
    assert seen == [4]


def test_decorator_form_and_order():
    bus = EventBus()
    calls = []

    @bus.on(Event.TRAIN_START)
    def first(engine):
        calls.append("first")

    bus.on(Event.TRAIN_START, lambda e: calls.append("second"))
    bus.fire(Event.TRAIN_START, SimpleNamespace(step=0, epoch=0))
    assert calls == ["first", "second"]


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, engine):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]

    def other(self, engine):
        pass


def test_stateful_hooks_found_once_under_their_given_names():
    bus = EventBus()
    a, b = Counter(), Counter()
    bus.on(Event.STEP_END, b, name="second")
    bus.on(Event.STEP_END, a, name="first")
    bus.on(Event.TRAIN_END, a.other)  # same object, second event: keeps its name, saved once
    bus.on(Event.STEP_END, lambda e: None)  # stateless
    assert bus.stateful() == {"second": b, "first": a}
    assert [s.name for s in bus.subscriptions() if s.fn == a.other] == ["first"]


def test_stateful_hook_defaults_to_its_class_name():
    bus = EventBus()
    counter = Counter()
    bus.on(Event.STEP_END, counter)
    assert bus.stateful() == {"Counter": counter}


def test_two_stateful_hooks_with_one_name_are_refused():
    bus = EventBus()
    bus.on(Event.STEP_END, Counter())
    with pytest.raises(
        ValueError, match=r"two hooks named 'Counter': Counter at 0x\w+ and Counter"
    ):
        bus.on(Event.STEP_END, Counter())
    with pytest.raises(ValueError, match="pass a distinct name="):
        bus.on(Event.STEP_END, Counter(), name="Counter")
    assert len(bus.subscriptions()) == 1  # nothing of the refused hooks was subscribed


def test_stateful_hook_keeps_one_name():
    bus = EventBus()
    counter = Counter()
    bus.on(Event.STEP_END, counter, name="a")
    with pytest.raises(ValueError, match="subscribed as 'a', not 'b'"):
        bus.on(Event.TRAIN_END, counter.other, name="b")


def test_stateful_hook_may_not_take_a_plain_callables_name():
    bus = EventBus()
    bus.on(Event.STEP_END, lambda e: None, name="log")
    with pytest.raises(ValueError, match="two hooks named 'log'"):
        bus.on(Event.STEP_END, Counter(), name="log")


def test_plain_callables_sharing_a_name_get_suffixes():
    bus = EventBus()
    bus.on(Event.STEP_END, Counter(), name="log")
    bus.on(Event.STEP_END, lambda e: None, name="log")
    bus.on(Event.STEP_END, lambda e: None, name="log")
    assert [s.name for s in bus.subscriptions()] == ["log", "log#2", "log#3"]
    assert list(bus.stateful()) == ["log"]


def test_saved_states_go_to_hooks_by_name_whenever_they_subscribe(caplog):
    bus = EventBus()
    early, late = Counter(), Counter()
    bus.on(Event.STEP_END, early, name="early")
    bus.load_states({"late": {"n": 2}, "early": {"n": 1}, "gone": {"n": 3}})
    assert early.n == 1 and late.n == 0
    bus.on(Event.STEP_END, late, name="late")
    bus.load_pending_states(warn_unused=True)
    assert late.n == 2
    assert "checkpoint holds state for hook 'gone', which is not subscribed" in caplog.text
    assert bus.state_dicts() == {"early": {"n": 1}, "late": {"n": 2}}
