"""Epochs as X-modaler counts them: `train.epochs`, `eval.every_epochs`, `checkpoint.every_epochs`
become steps for the dataset, the global batch and the world size (setup.resolve_epochs)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader

from conftest import run_toy
from xmodaler_accel import build_train_loader
from xmodaler_accel.config import ConfigError
from xmodaler_accel.optim import lr_factor
from xmodaler_accel.samplers import steps_per_epoch
from xmodaler_accel.setup import resolve_epochs
from xmodaler_accel.tasks.captioning import load_caption_config, load_scst_config

REPO = Path(__file__).resolve().parents[1]
COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval


@pytest.mark.parametrize("num_samples", [200, 201, 96, 7])
@pytest.mark.parametrize("batch_size", [8, 5])
@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_steps_per_epoch_is_accelerates_batches_per_process(
    num_samples, batch_size, processes, drop_last, accum
):
    """Accelerate's own sharding is the reference: every process gets as many batches."""
    batches = BatchSampler(range(num_samples), batch_size, drop_last)
    lengths = {
        len(BatchSamplerShard(batches, num_processes=processes, process_index=rank))
        for rank in range(processes)
    }
    assert len(lengths) == 1
    expected = math.ceil(lengths.pop() / accum)
    ours = steps_per_epoch(
        num_samples, batch_size, num_processes=processes, grad_accum=accum, drop_last=drop_last
    )
    assert ours == expected


def test_one_process_epoch_is_xmodalers_drop_last_loader():
    """X-modaler's iters_per_epoch: len(DataLoader(..., drop_last=True)) on one GPU."""
    for batch_size in (8, 16):
        xmodaler = len(DataLoader(range(COCO_TRAIN_IMAGES), batch_size=batch_size, drop_last=True))
        assert steps_per_epoch(COCO_TRAIN_IMAGES, batch_size) == xmodaler
    assert steps_per_epoch(COCO_TRAIN_IMAGES, 8) == 14_160
    assert steps_per_epoch(COCO_TRAIN_IMAGES, 16) == 7_080


def _accelerator(processes: int, accum: int = 1) -> SimpleNamespace:
    return SimpleNamespace(num_processes=processes, gradient_accumulation_steps=accum)


def _coco_loader(batch_size: int) -> DataLoader:
    return build_train_loader(range(COCO_TRAIN_IMAGES), batch_size, seed=0)


@pytest.mark.parametrize("processes", [1, 8])
def test_coco_yaml_trains_30_epochs_on_any_number_of_processes(processes):
    """The published schedule: 30 epochs, evaluation and a checkpoint every epoch, whatever the
    world size (the step counts of the old coco.yaml assumed one process)."""
    cfg = load_caption_config(REPO / "recipes/coco.yaml")
    per_epoch = resolve_epochs(cfg, _accelerator(processes), _coco_loader(cfg.train.batch_size))
    assert per_epoch == COCO_TRAIN_IMAGES // (8 * processes)
    assert cfg.train.max_steps == 30 * per_epoch
    assert cfg.eval.every == cfg.checkpoint.every == per_epoch
    scst = load_scst_config(REPO / "recipes/coco.yaml", ["model.weights=xe.safetensors"])
    per_epoch = resolve_epochs(scst, _accelerator(processes), _coco_loader(16))
    assert per_epoch == COCO_TRAIN_IMAGES // (16 * processes)
    assert (scst.train.max_steps, scst.eval.every) == (30 * per_epoch, per_epoch)
    assert scst.checkpoint.every == per_epoch


def test_accumulation_counts_optimizer_steps():
    cfg = load_caption_config(REPO / "recipes/coco.yaml")
    assert resolve_epochs(cfg, _accelerator(2, accum=4), _coco_loader(8)) == math.ceil(
        COCO_TRAIN_IMAGES // 16 / 4
    )


def test_a_step_setting_that_disagrees_with_its_epoch_setting_is_refused():
    cfg = load_caption_config(REPO / "recipes/coco.yaml", ["train.max_steps=424830"])
    with pytest.raises(ConfigError) as err:
        resolve_epochs(cfg, _accelerator(1), _coco_loader(8))
    message = str(err.value)
    assert "'train.epochs' (30 = 424800 steps of 14160 per epoch" in message
    assert "'train.max_steps' (424830) disagree" in message
    # The same length given twice is one setting.
    cfg = load_caption_config(REPO / "recipes/coco.yaml", ["train.max_steps=424800"])
    assert resolve_epochs(cfg, _accelerator(1), _coco_loader(8)) == 14_160


def test_no_training_length_is_an_error():
    cfg = load_caption_config(REPO / "recipes/coco.yaml", ["train.epochs=null"])
    with pytest.raises(ConfigError, match="train.max_steps=<steps> or train.epochs=<n>"):
        resolve_epochs(cfg, _accelerator(1), _coco_loader(8))


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())


def _trainer_state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())


EPOCH_RUN = ("train.max_steps=null", "train.epochs=2", "checkpoint.every=0")


@pytest.mark.parametrize("nproc", [1, 2])
def test_epochs_through_the_cli_on_1_and_2_processes(tmp_path, nproc):
    """The toy recipe (200 samples, 8 per batch, last batch kept): an epoch is 25 steps on one
    process and 13 on two; a checkpoint every epoch lands where the Engine finishes a pass."""
    out = tmp_path / "run"
    proc = run_toy(out, *EPOCH_RUN, "checkpoint.every_epochs=1", "checkpoint.keep=5", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_epoch = {1: 25, 2: 13}[nproc]
    assert _checkpoint_steps(out) == [per_epoch, 2 * per_epoch]
    first = _trainer_state(out, per_epoch)
    global_batch = 8 * nproc
    # The epoch's last step consumed the last samples: one step fewer would leave some.
    assert (per_epoch - 1) * global_batch < 200 <= first["samples_in_epoch"]
    assert _trainer_state(out, 2 * per_epoch)["step"] == 2 * per_epoch
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["max_steps"] == 2 * per_epoch
    assert saved["checkpoint"]["every"] == per_epoch
    assert (
        f"train.epochs 2: train.max_steps {2 * per_epoch} ({per_epoch} steps per epoch"
        in (out / "log.txt").read_text()
    )


def test_disagreeing_lengths_through_the_cli_are_one_line_errors(tmp_path):
    proc = run_toy(tmp_path / "run", "train.epochs=2")  # toy.yaml: train.max_steps 60
    assert proc.returncode == 2
    assert "error: config keys 'train.epochs' (2 = 50 steps" in proc.stderr
    assert "'train.max_steps' (60) disagree: give one, e.g. train.max_steps=null" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_step_lr_decays_every_n_epochs_as_xmodalers_steplr():
    """X-modaler's StepLR: step_size = STEP_SIZE * iters_per_epoch."""
    overrides = ["lr_scheduler.name=step", "lr_scheduler.step_size_epochs=3"]
    cfg = load_caption_config(REPO / "recipes/coco.yaml", overrides)
    resolve_epochs(cfg, _accelerator(1), _coco_loader(8))
    assert cfg.lr_scheduler.step_size == 3 * 14_160
    factor = lr_factor(cfg, cfg.train.max_steps)
    assert factor(3 * 14_160 - 1) == 1.0 and factor(3 * 14_160) == cfg.lr_scheduler.gamma
    cfg = load_caption_config(REPO / "recipes/coco.yaml", ["lr_scheduler.name=step"])
    with pytest.raises(ConfigError, match="lr_scheduler.step_size_epochs"):
        lr_factor(cfg, 100)
