"""Event bus filters and hook naming."""

from types import SimpleNamespace

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


def test_stateful_hooks_found_once_with_unique_names():
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

    bus = EventBus()
    a, b = Counter(), Counter()
    bus.on(Event.STEP_END, a)
    bus.on(Event.TRAIN_END, a.other)  # same object, second event: saved once
    bus.on(Event.STEP_END, b)
    bus.on(Event.STEP_END, lambda e: None)  # stateless
    found = bus.stateful()
    assert list(found) == ["Counter", "Counter#2"]
    assert found["Counter"] is a and found["Counter#2"] is b
