"""A user's first commands: `--help` answers before torch is imported, `--print-config` prints
what a run would write to config.yaml (and runs nothing), and `${key}` references in configs."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO, subprocess_env
from xmodaler_accel.config import ConfigError, load_config
from xmodaler_accel.tasks.captioning import load_caption_config, load_scst_config

SCRIPTS = [
    "recipes/xe.py",
    "recipes/scst.py",
    "recipes/retrieval.py",
    "recipes/vcr.py",
    "recipes/pretrain.py",
    "recipes/demo.py",
    "examples/custom_hook.py",
    "examples/custom_model.py",
]
HEAVY = ("torch", "transformers", "datasets", "accelerate", "numpy")
SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 8, "num_test": 8}
# Tiny sizes, and data.max_seq_len=8: synthetic.yaml's decode.max_len is ${data.max_seq_len}.
TINY = [
    *(f"data.synthetic.{k}={v}" for k, v in SYNTHETIC.items()),
    "model.transformer.d_model=32",
    "model.transformer.num_heads=2",
    "model.transformer.ffn_dim=64",
    "model.transformer.num_encoder_layers=1",
    "model.transformer.num_decoder_layers=1",
    "data.max_seq_len=8",
    "train.batch_size=4",
    "train.max_steps=2",
    "checkpoint.every=2",
    "eval.every=0",
    "eval.batch_size=8",
]


def cli(*args, cwd=REPO, importtime=False):
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, *map(str, args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def imported(stderr: str) -> set[str]:
    """Top-level packages named by `-X importtime` (every module the process imported)."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    proc = cli(REPO / script, "--help", importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--config" in proc.stdout and "--print-config" in proc.stdout
    assert not imported(proc.stderr) & set(HEAVY)


def test_a_mistyped_flag_answers_without_importing_torch():
    proc = cli(REPO / "recipes/xe.py", "--config", "x.yaml", "--eval_only", importtime=True)
    assert proc.returncode == 2 and "unrecognized arguments: --eval_only" in proc.stderr
    assert not imported(proc.stderr) & set(HEAVY)
    missing = cli(REPO / "recipes/retrieval.py", "--resume")
    assert missing.returncode == 2 and "--config" in missing.stderr


# ------------------------------------------------------------------------------ --print-config
def test_print_config_is_the_config_yaml_a_run_writes_and_writes_nothing(tmp_path):
    """As a user runs it: the printed YAML (YAML, overrides and references applied) is what the
    same command without --print-config writes to config.yaml; printing writes nothing."""
    out = tmp_path / "run"
    args = ["--config", REPO / "recipes/synthetic.yaml", *TINY, f"data.cache_dir={tmp_path}"]
    args += [f"output_dir={out}", "optim.lr=0.000123"]
    work = tmp_path / "cwd"
    work.mkdir()

    printed = cli(REPO / "recipes/xe.py", *args, "--print-config", cwd=work)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert not out.exists() and not any(work.iterdir()) and not any(tmp_path.glob("*synthetic*"))
    shown = yaml.safe_load(printed.stdout)
    assert shown["output_dir"] == str(out) and shown["optim"]["lr"] == 0.000123
    assert shown["train"]["max_steps"] == 2 and shown["model"]["transformer"]["d_model"] == 32
    assert shown["decode"]["max_len"] == 8  # ${data.max_seq_len}, after the override
    assert shown["mixed_precision"] == "no" and shown["train"]["grad_accum"] == 1  # resolved

    ran = cli(REPO / "recipes/xe.py", *args, cwd=work)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    written = (out / "config.yaml").read_text()
    assert "${" not in written  # plain values only
    assert yaml.safe_load(written) == shown
    assert printed.stdout == written


def test_print_config_of_scst_applies_its_section_and_starts_no_processes(tmp_path):
    proc = cli(
        REPO / "recipes/scst.py",
        "--config",
        REPO / "recipes/synthetic.yaml",
        "--print-config",
        "--num-gpus",
        "2",
        "model.weights=xe.safetensors",
        "scst.train.max_steps=11",
        "data.max_seq_len=9",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (shown,) = yaml.safe_load_all(proc.stdout)  # one process printed one document
    assert shown["output_dir"] == "output/synthetic_scst"  # the `scst:` section
    assert shown["train"]["max_steps"] == 11 and shown["optim"]["lr"] == 0.00002
    assert shown["decode"]["max_len"] == 9 and shown["model"]["weights"] == "xe.safetensors"
    assert not any(tmp_path.iterdir())


def test_print_config_reports_a_config_error_in_one_line(tmp_path):
    bad = write(
        tmp_path / "bad.yaml",
        f"""
        _base_: {REPO / "recipes/synthetic.yaml"}
        decode: {{max_len: "${{data.max_sq_len}}"}}
        """,
    )
    proc = cli(REPO / "recipes/xe.py", "--config", bad, "--print-config", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "config key 'decode.max_len': ${data.max_sq_len} refers to an unknown config key "
        "'data.max_sq_len'; did you mean 'data.max_seq_len'" in proc.stderr
    )
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# ---------------------------------------------------------------------------- ${key} references
@pytest.fixture
def refs(tmp_path):
    return write(
        tmp_path / "refs.yaml",
        """
        output_dir: out/${model.kind}_${model.d_model}_${model.tied}
        lr_scheduler:
          model_size: ${model.d_model}
        optim: {betas: "${model.betas}"}
        model:
          kind: tiny
          d_model: 128
          tied: true
          betas: [0.5, 0.6]
          widths: ["${model.d_model}", 7]
          copy_of: ${optim}
        """,
    )


def test_a_reference_takes_the_value_and_type_of_its_target(refs):
    cfg = load_config(refs)
    assert cfg.lr_scheduler.model_size == 128 and isinstance(cfg.lr_scheduler.model_size, int)
    assert cfg.model.widths == [128, 7] and cfg.optim.betas == [0.5, 0.6]
    assert cfg.output_dir == "out/tiny_128_true"  # inside a string: the target as text
    assert cfg.model.copy_of == cfg.optim and cfg.model.copy_of.lr == 0.0001  # a whole section


def test_an_override_of_the_target_reaches_every_reference(refs):
    cfg = load_config(refs, ["model.d_model=512", "optim.lr=0.5"])
    assert (cfg.lr_scheduler.model_size, cfg.model.widths) == (512, [512, 7])
    assert cfg.output_dir == "out/tiny_512_true" and cfg.model.copy_of.lr == 0.5
    # An override of the referring key replaces the reference, typed as the value it held.
    mine = load_config(refs, ["lr_scheduler.model_size=64", "output_dir=123"])
    assert mine.lr_scheduler.model_size == 64 and mine.output_dir == "123"
    with pytest.raises(ConfigError, match=r"'lr_scheduler.model_size': expected int, got str"):
        load_config(refs, ["lr_scheduler.model_size=wide"])
    # An override may be a reference itself.
    assert load_config(refs, ["train.batch_size=${model.d_model}"]).train.batch_size == 128


def test_an_unknown_reference_names_the_key_and_suggests(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {d_model: 8}\nlr_scheduler: {model_size: 16}\n")
    with pytest.raises(
        ConfigError,
        match=r"config key 'lr_scheduler.model_size': \$\{model.d_modl\} refers to an unknown "
        r"config key 'model.d_modl'; did you mean 'model.d_model'",
    ):
        load_config(path, ["lr_scheduler.model_size=${model.d_modl}"])


def test_a_cycle_of_references_names_the_keys(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        """
        model: {a: "${model.b}", b: "${model.c}", c: "${model.a}"}
        """,
    )
    with pytest.raises(
        ConfigError,
        match=r"c.yaml: config key 'model.c': \$\{model.a\} makes a cycle of references: "
        r"model.a -> model.b -> model.c -> model.a",
    ):
        load_config(path)
    path.write_text('train: {batch_size: "${train.batch_size}"}\n')
    with pytest.raises(
        ConfigError, match=r"'train.batch_size'.*train.batch_size -> train.batch_size"
    ):
        load_config(path)
    path.write_text('model: {x: "${model}"}\n')  # a key inside its own target
    with pytest.raises(ConfigError, match=r"'model.x'.*model -> model.x -> model"):
        load_config(path)


def test_resolved_values_are_type_checked_and_strings_take_scalars_only(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {kind: big}\n")
    with pytest.raises(
        ConfigError, match=r"'train.max_steps': expected int, got str \('big'\), from '\$\{model"
    ):
        load_config(path, ["train.max_steps=${model.kind}"])
    with pytest.raises(ConfigError, match=r"'output_dir': \$\{optim.betas\} inside a string"):
        load_config(path, ["output_dir=out/${optim.betas}"])
    with pytest.raises(ConfigError, match=r"'output_dir': cannot read the reference"):
        load_config(path, ["output_dir=out/${model.kind"])
    with pytest.raises(ConfigError, match=r"mixed_precision': 'big' is not one of"):
        load_config(path, ["mixed_precision=${model.kind}"])  # choices: after resolution


def test_coco_yaml_refers_instead_of_repeating(tmp_path):
    text = (REPO / "recipes/coco.yaml").read_text()
    assert "model_size: ${model.transformer.d_model}" in text
    cfg = load_caption_config(REPO / "recipes/coco.yaml")
    assert cfg.lr_scheduler.model_size == cfg.model.transformer.d_model == 512
    assert cfg.decode.max_len == cfg.data.max_seq_len == 20
    wide = load_caption_config(REPO / "recipes/coco.yaml", ["model.transformer.d_model=1024"])
    assert wide.lr_scheduler.model_size == 1024


def test_scst_references_see_the_values_its_section_sets(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        f"""
        _base_: {REPO / "recipes/synthetic.yaml"}
        scst: {{data: {{max_seq_len: 12}}}}
        """,
    )
    xe = load_caption_config(path)
    scst = load_scst_config(path, ["model.weights=xe.safetensors"])
    assert (xe.decode.max_len, scst.decode.max_len) == (20, 12)
    assert scst.scst.data.max_seq_len == 12 and "${" not in yaml.safe_dump(scst.to_dict())
