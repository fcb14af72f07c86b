"""The captioning task's hooks on a real Engine."""

import torch

from conftest import make_engine
from xmodaler_accel import Event
from xmodaler_accel.tasks.captioning import ScheduledSampling


def test_scheduled_sampling_raises_probability_per_epoch(tmp_path):
    model = torch.nn.Linear(8, 1)
    seen = {}
    engine = make_engine(tmp_path, model=model, batch_size=32, max_steps=10)  # 2 steps/epoch
    ScheduledSampling(start_epoch=0, increase_every=2, increase_prob=0.05, max_prob=0.1).attach(
        engine
    )
    engine.on(Event.EPOCH_START, lambda e: seen.__setitem__(e.epoch, model.ss_prob))
    engine.run()
    assert seen == {0: 0.0, 1: 0.0, 2: 0.05, 3: 0.05, 4: 0.1}
