"""W&B as W&B users expect: the mode follows WANDB_MODE and `wandb offline` unless the config sets
it (and then they must agree); metrics under train/ and eval/; environment and parameter count in
the run config; the sweep example gives each run its own output_dir. Never contacts a server."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import BIN, REPO, run_toy, subprocess_env
from xmodaler_accel.config import DEFAULTS, Config, ConfigError, load_config
from xmodaler_accel.setup import resolve_wandb_mode, resolve_wandb_settings
from xmodaler_accel.writers import WandBWriter

needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb is not installed"
)
NO_FILES: list[Path] = []  # no W&B settings files: the selection sees only key and environment
NO_GLOBAL = {"WANDB_CONFIG_DIR": "/nonexistent/wandb"}  # not the ~/.config/wandb of this machine


# ------------------------------------------------------------------ reading an offline run
def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` (W&B's LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def history_keys(records: list) -> set[str]:
    keys = set()
    for record in records:
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return {k for k in keys if not k.startswith("_")}


def config_values(records: list) -> dict:
    values = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else ()
        updates = record.config.update if kind == "config" else updates
        for item in updates:
            values[item.key] = json.loads(item.value_json)
    return values


# ------------------------------------------------------------------ mode selection
def test_no_mode_anywhere_is_online():
    assert resolve_wandb_mode(None, env={}, settings_files=NO_FILES)[0] == "online"


@pytest.mark.parametrize("value, mode", [("offline", "offline"), ("dryrun", "offline"),
                                         ("disabled", "disabled"), ("online", "online")])  # fmt: skip
def test_wandb_mode_is_respected_when_the_key_is_null(value, mode):
    got, source = resolve_wandb_mode(None, env={"WANDB_MODE": value}, settings_files=NO_FILES)
    assert (got, source) == (mode, "WANDB_MODE")


def test_key_and_wandb_mode_that_agree_run():
    env = {"WANDB_MODE": "offline"}
    assert resolve_wandb_mode("offline", env=env, settings_files=NO_FILES)[0] == "offline"
    assert resolve_wandb_mode("offline", env={}, settings_files=NO_FILES)[0] == "offline"


def test_key_and_wandb_mode_that_disagree_are_an_error_naming_both():
    with pytest.raises(ConfigError) as err:
        resolve_wandb_mode("online", env={"WANDB_MODE": "offline"}, settings_files=NO_FILES)
    message = str(err.value)
    assert "logging.wandb.mode" in message and "'online'" in message
    assert "WANDB_MODE" in message and "'offline'" in message


def test_an_unknown_wandb_mode_is_an_error():
    with pytest.raises(ConfigError, match="WANDB_MODE: 'ofline' is not a W&B mode"):
        resolve_wandb_mode(None, env={"WANDB_MODE": "ofline"}, settings_files=NO_FILES)


@needs_wandb
def test_wandb_offline_settings_file_is_respected(tmp_path, monkeypatch):
    """`wandb offline` (the installed CLI) writes ./wandb/settings; W&B itself then runs offline,
    and so does the selection; `wandb online` undoes it."""
    work, config_dir = tmp_path / "work", tmp_path / "config"
    work.mkdir()
    env = subprocess_env(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(config_dir), WANDB_SILENT="true")

    def wandb_cli(*args: str) -> None:
        proc = subprocess.run([str(BIN / "wandb"), *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]

    def wandb_own_mode() -> str:  # what the installed wandb resolves, in that directory
        code = "from wandb.sdk import wandb_setup; print(wandb_setup.singleton().settings.mode)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()[-1]

    monkeypatch.chdir(work)
    ours = {"WANDB_CONFIG_DIR": str(config_dir)}
    wandb_cli("offline")
    assert (work / "wandb" / "settings").is_file()
    assert wandb_own_mode() == "offline"
    assert resolve_wandb_mode(None, env=ours)[0] == "offline"
    assert resolve_wandb_mode(None, env={**ours, "WANDB_MODE": "online"})[0] == "online"
    with pytest.raises(ConfigError, match=r"'online' but W&B's settings file .*wandb/settings"):
        resolve_wandb_mode("online", env=ours)
    wandb_cli("online")
    assert wandb_own_mode() == "online"
    assert resolve_wandb_mode(None, env=ours)[0] == "online"
    assert resolve_wandb_mode("online", env=ours)[0] == "online"


def test_global_settings_file_under_wandb_config_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings").write_text("[default]\nmode = offline\n")
    env = {"WANDB_CONFIG_DIR": str(tmp_path / "config")}
    assert resolve_wandb_mode(None, env=env)[0] == "offline"


# ------------------------------------------------------------------ the other keys
def wandb_config(**wandb) -> Config:
    cfg = Config(DEFAULTS)
    cfg.output_dir = "/tmp/out/run7"
    cfg.logging.wandb.update({"project": "p", **wandb})
    return cfg


def test_settings_follow_the_environment_when_keys_are_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings
    cfg = wandb_config()
    kwargs = resolve_wandb_settings(cfg, env={**NO_GLOBAL, "WANDB_MODE": "offline"})
    assert kwargs["mode"] == "offline" and cfg.logging.wandb.mode == "offline"  # recorded
    assert kwargs["name"] == "run7" and kwargs["dir"] == "/tmp/out/run7"
    assert "entity" not in kwargs
    env = {**NO_GLOBAL, "WANDB_MODE": "offline", "WANDB_NAME": "mine", "WANDB_DIR": "/scratch"}
    kwargs = resolve_wandb_settings(wandb_config(), env=env)
    assert "name" not in kwargs and "dir" not in kwargs  # W&B reads the variables


@pytest.mark.parametrize("key, var", [("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY"),
                                      ("name", "WANDB_NAME")])  # fmt: skip
def test_a_key_and_its_wandb_variable_that_disagree_are_an_error(key, var, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"'logging.wandb.{key}' is 'ours' but {var} is 'w'"):
        resolve_wandb_settings(
            wandb_config(**{key: "ours"}), env={"WANDB_MODE": "offline", var: "w"}
        )


def test_a_project_without_wandb_installed_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    with pytest.raises(
        ConfigError,
        match=r"wandb is not installed: `pip install .xmodaler-accel\[wandb\].` \(or wandb\)",
    ):
        resolve_wandb_settings(wandb_config(), env=NO_GLOBAL)
    assert (
        resolve_wandb_settings(wandb_config(mode="disabled"), env=NO_GLOBAL)["mode"] == "disabled"
    )


def test_mode_key_loads_null_and_accepts_w_and_b_modes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    assert load_config(path).logging.wandb.mode is None
    assert load_config(path, ["logging.wandb.mode=offline"]).logging.wandb.mode == "offline"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config(path, ["logging.wandb.mode=sometimes"])


# ------------------------------------------------------------------ names
class FakeRun:
    def __init__(self):
        self.logged, self.config = [], SimpleNamespace(update=lambda *a, **k: None)

    def log(self, values, step=None):
        self.logged.append((step, values))


def test_writer_puts_training_under_train_and_evaluation_under_eval():
    writer = WandBWriter("p", mode="offline")
    writer.run = FakeRun()
    writer.log({"loss": 1.0, "lr": 0.1, "custom/x": 2.0}, step=5)
    writer.log({"val/CIDEr": 0.5, "val/Bleu_4": 0.2}, step=5)
    writer.log({"eval/test/CIDEr": 0.4, "train/extra": 3}, step=6)  # already placed: kept
    assert writer.run.logged == [
        (5, {"train/loss": 1.0, "train/lr": 0.1, "train/custom/x": 2.0}),
        (5, {"eval/val/CIDEr": 0.5, "eval/val/Bleu_4": 0.2}),
        (6, {"eval/test/CIDEr": 0.4, "train/extra": 3}),
    ]


# ------------------------------------------------------------------ through the CLI
@needs_wandb
def test_recipe_logs_offline_run_with_prefixed_names_and_environment(tmp_path):
    out = tmp_path / "run"
    proc = run_toy(
        out,
        "train.max_steps=10",
        "logging.wandb.project=xa-test",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: project xa-test, mode offline (WANDB_MODE)" in (out / "log.txt").read_text()
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["logging"]["wandb"]["mode"] == "offline"
    )
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    keys = history_keys(records)
    # The toy recipe has no evaluation: everything it logs is training.
    assert {"train/loss", "train/abs_err", "train/lr", "train/epoch", "train/samples_per_s"} <= keys
    assert all(k.startswith("train/") for k in keys), keys
    config = config_values(records)
    assert config["train.max_steps"] == 10  # the resolved config
    assert config["environment"]["torch"] and config["environment"]["processes"].startswith("1 ")
    assert config["num_parameters"] == 16 * 32 + 32 + 32 + 1  # the toy's two Linear layers
    # Console and metrics.jsonl keep the plain names.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss" in rows[-1] and "train/loss" not in rows[-1]


def test_recipe_stops_at_start_when_key_and_wandb_mode_disagree(tmp_path):
    out = tmp_path / "run"
    proc = run_toy(
        out,
        "logging.wandb.project=xa-test",
        "logging.wandb.mode=online",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "'logging.wandb.mode' is 'online' but WANDB_MODE is 'offline'" in lines[0]
    assert not out.exists()  # refused before anything was written


@needs_wandb
def test_captioning_recipe_logs_evaluation_under_eval(tmp_path):
    """xe.py evaluates: its scores and sample table go under eval/<split>/, training under train/."""
    tiny = ["data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.num_test=16",
            "data.synthetic.feat_dim=32", "model.transformer.d_model=32",
            "model.transformer.num_heads=2", "model.transformer.ffn_dim=64",
            "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=1",
            "train.batch_size=8", "train.max_steps=2", "train.log_every=1", "eval.splits=[val]",
            "eval.batch_size=16", "eval.metrics=[bleu,cider]", "decode.max_len=8"]  # fmt: skip
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "recipes/xe.py"),
        "--config",
        str(REPO / "recipes/synthetic.yaml"),
    ]
    cmd += [*tiny, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={out}"]
    cmd += ["logging.wandb.project=xa-test"]
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    keys = history_keys(wandb_records(run_dir))
    assert {"eval/val/CIDEr", "eval/val/Bleu_4", "train/loss", "train/epoch"} <= keys
    assert "eval/val/samples/_type" in keys  # the sample table (W&B stores its fields)
    assert all(k.startswith(("train/", "eval/val/")) for k in keys), keys
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/CIDEr" in r for r in rows)  # metrics.jsonl keeps EvalHook's names


# ------------------------------------------------------------------ the sweep example
@needs_wandb
def test_sweep_command_gives_each_run_its_own_output_dir(tmp_path):
    """Expand the example's command as `wandb agent` does, with a program that prints its argv."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = yaml.safe_load((REPO / "examples/wandb_sweep.yaml").read_text())
    assert sweep["metric"]["name"] == "eval/val/CIDEr"
    args = {"optim.lr": {"value": 0.001}, "train.batch_size": {"value": 8}}
    variables = sweep_utils.create_sweep_command_args({"args": args})
    program = tmp_path / "argv.py"
    program.write_text("import json, sys; print(json.dumps(sys.argv[1:]))")
    variables.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[str(program)])
    command = []
    for part in sweep_utils.create_sweep_command(list(sweep["command"])):
        is_macro = part.startswith("${") and part.endswith("}")
        command += variables.get(part[2:-1]) or [] if is_macro else [part]
    for run_id, project in (("r1", None), ("r2", "agents-project")):
        env = {**os.environ, "WANDB_SWEEP_ID": "s9", "WANDB_RUN_ID": run_id}
        env.pop("WANDB_PROJECT", None)
        env.update({"WANDB_PROJECT": project} if project else {})
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [
            "--config",
            "recipes/synthetic.yaml",
            f"output_dir=output/sweeps/s9/{run_id}",
            f"logging.wandb.project={project or sweep['project']}",
            "optim.lr=0.001",
            "train.batch_size=8",
        ]
