"""Checkpoints that cannot be half-trusted: a manifest checked on resume, damaged checkpoints
skipped with a warning naming the file, unreadable files named, a failed write (disk full) that
leaves the previous checkpoint in place."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_bitwise_equal, load_final_state, make_engine, subprocess_env
from xmodaler_accel import checkpoint as ckpt
from xmodaler_accel.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    read_checkpoint,
    read_checkpoint_config,
    read_trainer_state,
)
from xmodaler_accel.config import Config
from xmodaler_accel.hooks import PeriodicCheckpointer


def dropout_model() -> torch.nn.Module:
    torch.manual_seed(0)  # dropout draws from the RNG that a checkpoint restores
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )


def train(out: Path, max_steps: int = 8, **engine_kwargs):
    """A run checkpointed every 4 steps (step_4, step_8, ...)."""
    engine = make_engine(out, model=dropout_model(), max_steps=max_steps, **engine_kwargs)
    PeriodicCheckpointer(4).attach(engine)
    engine.run()
    return engine


def resume(out: Path, max_steps: int = 12):
    engine = make_engine(out, model=dropout_model(), max_steps=max_steps)
    PeriodicCheckpointer(4).attach(engine)
    engine.resume()
    return engine


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def warnings_logged():
    """WARNING records of the checkpoint module (a handler of its own: propagation may be off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("xmodaler_accel.checkpoint")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def skip_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("skipping")]


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json"])
def test_truncated_file_in_newest_checkpoint_resumes_from_previous_with_warning(
    tmp_path, warnings_logged, damaged
):
    train(tmp_path)
    truncate(tmp_path / "checkpoints/step_8" / damaged)
    assert resume(tmp_path).step == 4
    [warning] = skip_warnings(warnings_logged)
    assert warning.startswith(f"skipping {tmp_path / 'checkpoints/step_8'}: {damaged} has ")


def test_deleted_optimizer_file_is_named_and_previous_checkpoint_used(tmp_path, warnings_logged):
    train(tmp_path)
    (tmp_path / "checkpoints/step_8/optimizer.pt").unlink()
    assert resume(tmp_path).step == 4
    assert skip_warnings(warnings_logged) == [
        f"skipping {tmp_path / 'checkpoints/step_8'}: optimizer.pt is missing"
    ]
    with pytest.raises(CheckpointError, match=r"step_8 cannot be used: optimizer.pt is missing"):
        make_engine(tmp_path / "other", model=dropout_model()).resume(
            tmp_path / "checkpoints/step_8"
        )


def test_deleted_rng_file_skips_the_checkpoint_and_reading_it_names_the_file(
    tmp_path, warnings_logged
):
    train(tmp_path)
    step_8 = tmp_path / "checkpoints/step_8"
    (step_8 / "rng_0.pt").unlink()
    assert resume(tmp_path).step == 4
    assert skip_warnings(warnings_logged) == [f"skipping {step_8}: rng_0.pt is missing"]
    engine = make_engine(tmp_path / "other", model=dropout_model())
    with pytest.raises(CheckpointError, match=r"checkpoint file missing: .*step_8/rng_0\.pt"):
        read_checkpoint(
            engine.accelerator,
            step_8,
            model=engine.model,
            optimizer=engine.optimizer,
            scheduler=None,
        )


def test_flipped_bytes_in_weights_fail_the_checksum(tmp_path, warnings_logged):
    train(tmp_path)
    weights = tmp_path / "checkpoints/step_8/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # inside the last tensor: same size
    weights.write_bytes(bytes(data))
    assert resume(tmp_path).step == 4
    assert skip_warnings(warnings_logged) == [
        f"skipping {weights.parent}: model.safetensors does not match its sha256 in manifest.json"
    ]


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    train(tmp_path)
    (tmp_path / "checkpoints/step_4/manifest.json").write_text("{")
    truncate(tmp_path / "checkpoints/step_8/hooks.pt")
    with pytest.raises(CheckpointError) as raised:
        resume(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"no intact checkpoint under {tmp_path / 'checkpoints'}")
    assert "step_8: hooks.pt has " in message and "step_4: manifest.json is unreadable" in message


def test_second_search_neither_hashes_nor_warns_again(tmp_path, warnings_logged, monkeypatch):
    train(tmp_path)
    truncate(tmp_path / "checkpoints/step_8/optimizer.pt")
    hashed = []
    original = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda path: hashed.append(path.name) or original(path))
    first = find_resume_checkpoint(tmp_path / "checkpoints")
    hashes = len(hashed)
    assert (
        find_resume_checkpoint(tmp_path / "checkpoints") == first == tmp_path / "checkpoints/step_4"
    )
    assert hashes > 0 and len(hashed) == hashes
    assert len(skip_warnings(warnings_logged)) == 1


def test_resume_after_skipping_a_damaged_checkpoint_is_bitwise_exact(tmp_path):
    train(tmp_path / "uninterrupted", max_steps=12)
    train(tmp_path / "damaged", max_steps=8)
    truncate(tmp_path / "damaged/checkpoints/step_8/model.safetensors")
    engine = resume(tmp_path / "damaged")
    assert engine.step == 4
    engine.run()
    assert_bitwise_equal(
        load_final_state(tmp_path / "damaged/checkpoints/step_12"),
        load_final_state(tmp_path / "uninterrupted/checkpoints/step_12"),
    )


def test_unreadable_files_are_named(tmp_path):
    train(tmp_path, max_steps=4)
    step_4 = tmp_path / "checkpoints/step_4"
    truncate(step_4 / "trainer_state.json")
    with pytest.raises(CheckpointError, match=r"cannot read .*step_4/trainer_state\.json"):
        read_trainer_state(step_4)
    truncate(step_4 / "model.safetensors")
    engine = make_engine(tmp_path / "other", model=dropout_model())
    with pytest.raises(CheckpointError, match=r"cannot read .*step_4/model\.safetensors"):
        ckpt.load_weights(engine.unwrapped_model, step_4)


def test_checkpoint_holds_config_and_wandb_run_id_listed_in_manifest(tmp_path):
    config = Config({"seed": 3, "train": {"max_steps": 4, "betas": [0.9, 0.99]}})
    engine = make_engine(tmp_path / "a", max_steps=4, config=config)
    engine.accelerator.trackers.append(SimpleNamespace(name="wandb", run=SimpleNamespace(id="r1")))
    path = engine.save_checkpoint()
    assert read_checkpoint_config(path) == config.to_dict()
    assert read_trainer_state(path)["wandb_run_id"] == "r1"
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(listed) == [
        "config.yaml",
        "hooks.pt",
        "model.safetensors",
        "optimizer.pt",
        "rng_0.pt",
        "trainer_state.json",
    ]
    plain = make_engine(tmp_path / "b", max_steps=4).save_checkpoint()
    assert read_checkpoint_config(plain) is None
    assert "wandb_run_id" not in read_trainer_state(plain)


# A file size limit makes every write past it fail with EFBIG, as a full disk fails with ENOSPC:
# 8 KB stops the first file (rng_0.pt, 15 KB, every process), 24 KB the weights (40 KB, main).
DISK_FULL_SCRIPT = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import make_engine
from xmodaler_accel import Event
from xmodaler_accel.checkpoint import CheckpointError
from xmodaler_accel.hooks import PeriodicCheckpointer

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
for limit in (8_000, 24_000):
    def fill_disk(engine, limit=limit):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    model = torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.Linear(1024, 1))
    engine = make_engine(
        Path(sys.argv[2]) / str(limit),
        model=model,
        max_steps=8,
        optimizer_fn=lambda params: torch.optim.SGD(params, lr=1e-3),
    )
    PeriodicCheckpointer(4).attach(engine)
    engine.on(Event.STEP_END, fill_disk, once=5)
    try:
        engine.run()
    except CheckpointError as err:
        print(err)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
"""


def test_disk_full_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    tests = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(tests), str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = proc.stdout.splitlines()
    for limit, file in ((8_000, "rng_0.pt"), (24_000, "model.safetensors")):
        ckpts = tmp_path / str(limit) / "checkpoints"
        [error] = [e for e in errors if str(ckpts) in e]
        assert error.startswith(f"could not write checkpoint {ckpts / 'step_8'}: {file}: ")
        assert "File too large" in error and "unexpected pos" not in error
        assert error.endswith(f"the previous checkpoint {ckpts / 'step_4'} is intact")
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_4"]  # no .tmp-step_8 left
        model = torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.Linear(1024, 1))
        resumed = make_engine(tmp_path / str(limit), model=model, max_steps=8)
        assert resumed.resume() and resumed.step == 4
