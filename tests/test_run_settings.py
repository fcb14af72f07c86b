"""Every setting a user gives is honoured or refused, through the command line as users run it:
launch flags, launcher settings against the YAML, enumerated keys, typos, and output dirs that
already hold a run (issue 14)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, REPO, TOY_CONFIG, TOY_SCRIPT, load_final_state, run_toy, subprocess_env
from xmodaler_accel.config import Config, ConfigError, load_config
from xmodaler_accel.setup import _free_port, resolve_launcher_settings
from xmodaler_accel.tasks.captioning import load_caption_config, load_scst_config
from xmodaler_accel.tasks.pretraining import load_pretrain_config
from xmodaler_accel.tasks.retrieval import load_retrieval_config
from xmodaler_accel.tasks.vcr import load_vcr_config

FAST = ["train.max_steps=4", "checkpoint.every=2", "train.log_every=2"]


def toy(tmp_path, *args, env=None, cmd=None, timeout=300):
    """The toy recipe with `args` (flags and overrides), under `cmd` (a launcher) if given."""
    full = [*(cmd or [sys.executable]), str(TOY_SCRIPT), "--config", str(TOY_CONFIG), *args]
    return subprocess.run(
        full,
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def assert_one_line_error(proc, *fragments, launcher=False):
    """Status 2, no traceback, one `error:` line holding `fragments`. Under a `launcher` (which
    reports a failed child with a traceback of its own) the script's exit status 2 is checked
    in the launcher's report."""
    if launcher:
        reported = (
            "exit status 2" in proc.stderr or "exitcode  : 2" in proc.stderr
        )  # accelerate, torchrun
        assert proc.returncode != 0 and reported, proc.stderr[-3000:]
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ launch flags
def test_num_gpus_starts_that_many_processes(tmp_path):
    out = tmp_path / "run"
    proc = toy(tmp_path, "--num-gpus", "2", *FAST, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes    2" in (out / "log.txt").read_text()
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_two_machines_join_through_dist_url(tmp_path):
    """--num-machines/--machine-rank/--dist-url: two 'machines' on localhost form one group
    (writing to one output_dir, as machines of a job do on shared storage)."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(TOY_SCRIPT),
                "--config",
                str(TOY_CONFIG),
                "--num-gpus",
                "1",
                "--num-machines",
                "2",
                "--machine-rank",
                str(rank),
                "--dist-url",
                url,
                *FAST,
                f"output_dir={out}",
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "processes    2" in (out / "log.txt").read_text()
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_num_gpus_under_a_launcher_is_refused(tmp_path):
    proc = toy(
        tmp_path,
        "--num-gpus",
        "2",
        f"output_dir={tmp_path / 'run'}",
        cmd=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1"],
    )
    assert_one_line_error(proc, "--num-gpus 2", "already started by a launcher", launcher=True)
    assert not (tmp_path / "run").exists()


def test_accelerate_launch_num_processes_on_cpu_is_refused(tmp_path):
    """`accelerate launch --num_processes 2` starts one process on a CPU machine: never train
    that silently as if it were the job asked for."""
    launcher = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = toy(tmp_path, *FAST, f"output_dir={tmp_path / 'run'}", cmd=launcher)
    assert_one_line_error(
        proc, "asked for 2 processes but started one", "--num-gpus N", launcher=True
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ launcher settings vs YAML
def test_launcher_precision_used_when_the_yaml_leaves_it_unset(tmp_path):
    out = tmp_path / "run"
    launcher = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "bf16", "--dynamo_backend", "no"]
    proc = toy(
        tmp_path, "train.max_steps=2", "checkpoint.every=0", f"output_dir={out}", cmd=launcher
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision    bf16" in (out / "log.txt").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "bf16"
    conflict = toy(tmp_path, "mixed_precision=fp16", f"output_dir={tmp_path / 'b'}", cmd=launcher)
    assert_one_line_error(conflict, "'mixed_precision' is 'fp16'", "asks for 'bf16'", launcher=True)


def test_accelerate_launch_gradient_accumulation_flag_is_not_dropped_silently(tmp_path):
    launcher = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--gradient_accumulation_steps", "4"]
    proc = toy(tmp_path, *FAST, f"output_dir={tmp_path / 'run'}", cmd=launcher)
    assert_one_line_error(proc, "--gradient_accumulation_steps", "train.grad_accum=", launcher=True)


def test_launcher_grad_accum_precedence(tmp_path):
    env = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}
    out = tmp_path / "run"
    proc = toy(tmp_path, *FAST, f"output_dir={out}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["grad_accum"] == 2
    conflict = toy(tmp_path, "train.grad_accum=3", f"output_dir={tmp_path / 'b'}", env=env)
    assert_one_line_error(conflict, "'train.grad_accum' is 3", "asks for 2")


@pytest.mark.parametrize(
    ("yaml_value", "launcher", "expected"),
    [
        (None, None, "no"),  # nothing anywhere: the default
        (None, "bf16", "bf16"),  # unset in YAML: the launcher's
        ("fp16", None, "fp16"),  # set in YAML, launcher silent: the YAML's
        ("fp16", "no", "fp16"),  # accelerate launch passes "no" when given nothing
        ("bf16", "bf16", "bf16"),  # both, agreeing
    ],
)
def test_resolve_launcher_precision(yaml_value, launcher, expected):
    cfg = Config({"mixed_precision": yaml_value, "train": {"grad_accum": None}})
    env = {} if launcher is None else {"ACCELERATE_MIXED_PRECISION": launcher}
    resolve_launcher_settings(cfg, env)
    assert (cfg.mixed_precision, cfg.train.grad_accum) == (expected, 1)


def test_resolve_launcher_conflict_names_both():
    cfg = Config({"mixed_precision": "fp16", "train": {"grad_accum": None}})
    with pytest.raises(
        ConfigError, match="'mixed_precision' is 'fp16' but the launcher asks for 'bf16'"
    ):
        resolve_launcher_settings(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"})


# ------------------------------------------------------------------ config errors at load
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.clip_grad.mode=foo", ["'train.clip_grad.mode'", "'foo'", "'norm'"]),
        ("lr_scheduler.name=cosine", ["'lr_scheduler.name'", "'warmup_cosine'"]),
        ("trian.max_steps=3", ["'trian.max_steps'", "did you mean 'train.max_steps'"]),
        ("optim.lr_typo=1", ["'optim.lr_typo'", "did you mean 'optim.lr'"]),
    ],
)
def test_config_errors_are_one_line_before_anything_is_written(tmp_path, override, fragments):
    proc = toy(tmp_path, override, f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


TASK_ENUMS = {  # recipe: (its config, its loader, an enumerated key of its own set wrong)
    "xe": ("synthetic.yaml", load_caption_config, "rl.baseline=greedy_typo"),
    "scst": ("synthetic.yaml", load_scst_config, "rl.sampler=nucleus"),
    "retrieval": ("synthetic_retrieval.yaml", load_retrieval_config, "train.negative_side=left"),
    "vcr": ("synthetic_vcr.yaml", load_vcr_config, "vcr.mode=both"),
    "pretrain": ("synthetic_pretrain.yaml", load_pretrain_config, "pretrain.two_stage=twice"),
}


@pytest.mark.parametrize("recipe", list(TASK_ENUMS))
def test_every_recipes_loader_refuses_its_bad_enums(recipe):
    config, load, override = TASK_ENUMS[recipe]
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}': .* is not one of"):
        load(REPO / "recipes" / config, [override])
    with pytest.raises(ConfigError, match="'train.clip_grad.mode': 'foo' is not one of"):
        load(REPO / "recipes" / config, ["train.clip_grad.mode=foo"])


def test_a_recipe_refuses_a_bad_enum_in_one_line_before_building_anything(tmp_path):
    cmd = [sys.executable, str(REPO / "recipes" / "scst.py"), "--config"]
    cmd += [str(REPO / "recipes" / "synthetic.yaml"), "rl.sampler=nucleus"]
    cmd += [f"output_dir={tmp_path / 'run'}", "model.weights=unused.safetensors"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "'rl.sampler'", "'nucleus' is not one of 'sample', 'beam'")
    assert not (tmp_path / "run").exists()


def test_data_source_error_is_one_line(tmp_path):
    cmd = [sys.executable, str(REPO / "recipes" / "xe.py"), "--config"]
    cmd += [str(REPO / "recipes" / "synthetic.yaml"), f"data.source={tmp_path / 'nowhere'}"]
    cmd += [f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "'data.source'", str(tmp_path / "nowhere"))
    # The attempt wrote only its start-up files: the corrected command may use the same dir.
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.stat().st_size) <= [
        "config.yaml",
        "log.txt",
    ]


def test_typo_suggestions_cover_every_part_of_a_dotted_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 3}\n")
    for typo, meant in [
        ("trian.max_steps", "train.max_steps"),
        ("train.max_stesp", "train.max_steps"),
        ("optim.lr_typo", "optim.lr"),
        ("lr_schedular.name", "lr_scheduler.name"),
    ]:
        with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
            load_config(path, [f"{typo}=1"])


# ------------------------------------------------------------------ output directories
def test_a_new_run_never_writes_into_another_runs_dir(tmp_path):
    out = tmp_path / "run"
    assert run_toy(out, *FAST).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = run_toy(out, *FAST)
    assert_one_line_error(again, str(out), "--resume", "--overwrite", "output_dir=<new dir>")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    fresh = run_toy(
        out, "train.max_steps=3", "checkpoint.every=3", "train.log_every=1", "--overwrite"
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # only the new run's lines


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    proc = run_toy(out, *FAST, "--overwrite")
    assert_one_line_error(proc, "does not look like a run directory")
    assert (out / "thesis.tex").read_text() == "precious"


def test_resume_with_a_different_model_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    assert run_toy(out, *FAST).returncode == 0
    config_before = (out / "config.yaml").read_bytes()
    proc = run_toy(out, *FAST, "model.hidden=64", "optim.lr=0.5", resume=True)
    assert_one_line_error(proc, "model.hidden: 32 in the checkpoint, 64 now", "optim.lr")
    assert (out / "config.yaml").read_bytes() == config_before
    # Running longer is what a resume is for: allowed.
    longer = run_toy(
        out, "train.max_steps=6", "checkpoint.every=2", "train.log_every=2", resume=True
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert load_final_state(out / "checkpoints" / "step_6")


# ------------------------------------------------------------------ W&B across a resume
def test_resume_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "run"
    wandb = ["logging.wandb.project=xa-test", "logging.wandb.mode=offline"]
    env = {"WANDB_SILENT": "true", "TOY_KILL_AT": "3"}
    killed = run_toy(out, *FAST, *wandb, env=env)
    assert killed.returncode != 0  # SIGKILL after step 3; the checkpoint of step 2 is there
    resumed = run_toy(out, *FAST, *wandb, resume=True, env={"WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {run.name.rsplit("-", 1)[-1] for run in runs}
    assert len(ids) == 1, runs  # one W&B run, continued
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == ids.pop()
