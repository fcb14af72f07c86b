"""The captioning recipes and examples end to end on a tiny synthetic task (subprocesses)."""

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest
import yaml

from conftest import REPO, subprocess_env

TINY = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=16",
    "data.synthetic.num_test=16",
    "data.synthetic.feat_dim=32",
    "model.transformer.d_model=32",
    "model.transformer.num_heads=2",
    "model.transformer.ffn_dim=64",
    "model.transformer.num_encoder_layers=1",
    "model.transformer.num_decoder_layers=1",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.log_every=3",
    "eval.every=6",
    "checkpoint.every=3",
    "eval.batch_size=16",
    "decode.max_len=8",
]


def run(script, *args, cache):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / script),
            "--config",
            str(REPO / "recipes/synthetic.yaml"),
            *TINY,
            f"data.cache_dir={cache}",
            *args,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def xe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xe")
    proc = run("recipes/xe.py", f"output_dir={root / 'xe'}", cache=root / "cache")
    (root / "console.txt").write_text(proc.stdout + proc.stderr)
    return root


def test_xe_console_off_a_terminal_is_log_lines_only(xe_run):
    """No progress bars in a log; short training lines, loss first; one line per evaluation."""
    console = (xe_run / "console.txt").read_text()
    assert "\r" not in console and "it/s" not in console, console[-2000:]
    train_lines = [line for line in console.splitlines() if "] step " in line]
    assert len(train_lines) == 2, console[-2000:]  # log_every=3 of 6 steps
    for line in train_lines:
        fields = line.split("] ", 1)[1].split("  ")
        assert [f.split()[0] for f in fields[1:]][:4] == ["loss", "lr", "grad_norm", "time"]
        assert "data_time" not in line and "ss_prob" not in line
    assert "eta 0:00:00" in train_lines[-1]
    for split in ("val", "test"):
        evals = [line for line in console.splitlines() if f"eval {split} at step 6:" in line]
        assert len(evals) == 1, console[-2000:]
        assert "CIDEr " in evals[0] and "{" not in evals[0]
        values = [field.split()[1] for field in evals[0].split(": ", 1)[1].split("  ")[:-1]]
        assert all(len(v.replace(".", "").lstrip("0").split("e")[0]) <= 4 for v in values)
    rows = jsonl(xe_run / "xe" / "metrics.jsonl")
    assert "data_time" in rows[0] and "ss_prob" in rows[0]  # everything is still in the file


def test_xe_console_on_a_terminal_shows_a_training_bar(xe_run, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "recipes/xe.py"),
        "--config",
        str(REPO / "recipes/synthetic.yaml"),
        *TINY,
        f"data.cache_dir={xe_run / 'cache'}",
        f"output_dir={tmp_path / 'xe'}",
        "logging.console_fields=[loss,lr]",
    ]
    returncode, console = run_on_terminal(cmd, timeout=300)
    assert returncode == 0, console[-3000:]
    assert "train: 100%" in console and "6/6" in console and "step/s" in console, console[-3000:]
    assert "loss " in console.split("train: 100%", 1)[1].split("\n")[0]  # postfix at the end
    assert "eval val:" in console  # the evaluation's bar
    line = next(x for x in console.splitlines() if "] step 6/6" in x)
    assert "grad_norm" not in line and line.split("] ", 1)[1].split("  ")[1].startswith("loss ")


def run_on_terminal(cmd, timeout):
    """Run `cmd` with a pseudo-terminal as stdin/stdout/stderr; (returncode, what it printed)."""
    main_fd, child_fd = pty.openpty()
    # A real terminal's size: tqdm draws nothing into a 0-column one.
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        cmd, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=subprocess_env(), cwd=REPO
    )
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 1.0)
        try:
            data = os.read(main_fd, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            break
        if ready and not data:
            break
        chunks.append(data)
        if not ready and proc.poll() is not None:
            break
    os.close(main_fd)
    returncode = proc.wait(timeout=10)
    return returncode, b"".join(chunks).decode(errors="replace")


def test_xe_recipe_writes_the_output_contract(xe_run):
    out = xe_run / "xe"
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    result = json.loads((out / "eval" / "val_step6.json").read_text())
    assert result["split"] == "val" and result["step"] == 6
    assert set(result["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    captions = json.loads((out / "eval" / "test_step6_captions.json").read_text())
    assert len(captions) == 16 and len({c["image_id"] for c in captions}) == 16
    assert all(set(c) == {"image_id", "caption"} for c in captions)
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [3, 6]
    assert any("val/CIDEr" in r for r in rows)


def test_xe_resume_continues_from_the_newest_checkpoint(xe_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(xe_run / "xe", out)
    proc = run(
        "recipes/xe.py",
        f"output_dir={out}",
        "train.max_steps=9",
        "eval.every=9",
        "--resume",
        cache=xe_run / "cache",
    )
    assert "resumed from" in proc.stdout and "step_6" in proc.stdout
    assert (out / "eval" / "val_step9.json").is_file()
    assert [r["step"] for r in jsonl(out / "metrics.jsonl") if "loss" in r] == [3, 6, 9]


def test_xe_eval_only_scores_given_weights(xe_run, tmp_path):
    run(
        "recipes/xe.py",
        "--eval-only",
        f"output_dir={tmp_path}",
        f"model.weights={xe_run / 'xe/checkpoints/step_6'}",
        cache=xe_run / "cache",
    )
    direct = json.loads((tmp_path / "eval" / "val_step0.json").read_text())["metrics"]
    trained = json.loads((xe_run / "xe" / "eval" / "val_step6.json").read_text())["metrics"]
    assert direct == pytest.approx(trained)


def test_xe_eval_only_resume_scores_the_newest_checkpoint(xe_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(xe_run / "xe", out)
    shutil.rmtree(out / "eval")
    # Another batch size (as another process count would give) is fine for evaluation only.
    run("recipes/xe.py", "--eval-only", "--resume", "train.batch_size=4",
        f"output_dir={out}", cache=xe_run / "cache")  # fmt: skip
    again = json.loads((out / "eval" / "val_step6.json").read_text())["metrics"]
    trained = json.loads((xe_run / "xe" / "eval" / "val_step6.json").read_text())["metrics"]
    assert again == pytest.approx(trained)


def test_xe_eval_only_resume_without_a_checkpoint_is_an_error(xe_run, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "recipes/xe.py"),
        "--config",
        str(REPO / "recipes/synthetic.yaml"),
    ]
    cmd += [*TINY, f"data.cache_dir={xe_run / 'cache'}", f"output_dir={tmp_path}"]
    proc = subprocess.run(
        [*cmd, "--eval-only", "--resume"], env=subprocess_env(), capture_output=True, text=True,
        timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no complete checkpoint under" in proc.stderr


def test_scst_recipe_from_xe_weights_logs_rewards_and_time_split(xe_run):
    out = xe_run / "scst"
    run(
        "recipes/scst.py",
        f"model.weights={xe_run / 'xe/checkpoints/step_6'}",
        f"output_dir={out}",
        "train.max_steps=4",
        "eval.every=4",
        "train.log_every=2",
        cache=xe_run / "cache",
    )
    rows = [r for r in jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for key in (
        "reward",
        "baseline",
        "advantage_std",
        "time_generate",
        "time_reward",
        "time_forward",
        "time_backward",
    ):
        assert key in rows[-1], key
    assert (out / "eval" / "test_step4_captions.json").is_file()
    assert list((xe_run / "cache").glob("*/cider_cache/*"))  # document frequencies cached


def own_config(tmp_path):
    """A user's copy of synthetic.yaml with its own XE and SCST output directories."""
    path = tmp_path / "mine.yaml"
    path.write_text(
        f"_base_: {REPO / 'recipes/synthetic.yaml'}\n"
        f"output_dir: {tmp_path / 'xe'}\n"
        f"scst: {{output_dir: {tmp_path / 'scst'}}}\n"
    )
    return path


def test_scst_without_an_xe_run_says_to_run_xe_first(tmp_path):
    config = own_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes/scst.py"), "--config", str(config)],
        env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"run `python recipes/xe.py --config {config}` first" in proc.stderr
    assert not (tmp_path / "scst").exists()


def test_scst_starts_from_the_newest_checkpoint_of_the_xe_run(xe_run, tmp_path):
    config = own_config(tmp_path)
    shutil.copytree(xe_run / "xe", tmp_path / "xe")
    cmd = [sys.executable, str(REPO / "recipes/scst.py"), "--config", str(config), *TINY]
    cmd += [f"data.cache_dir={xe_run / 'cache'}", "train.max_steps=2", "eval.every=0"]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = yaml.safe_load((tmp_path / "scst/config.yaml").read_text())
    assert ran["model"]["weights"] == str(tmp_path / "xe/checkpoints/step_6")
    assert ran["output_dir"] == str(tmp_path / "scst") and ran["optim"]["lr"] == 2e-5
    assert (tmp_path / "scst/checkpoints/step_2").is_dir()


def test_example_custom_hook(xe_run, tmp_path):
    # --resume with no checkpoint yet starts from scratch, as in the recipes.
    run("examples/custom_hook.py", "--resume", f"output_dir={tmp_path}", cache=xe_run / "cache")
    last = [r for r in jsonl(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert last["images_per_s"] > 0 and last["lr_x1000"] > 0


def test_example_custom_model_trains_and_scores_its_own_weights(xe_run, tmp_path):
    run("examples/custom_model.py", f"output_dir={tmp_path / 'run'}", cache=xe_run / "cache")
    assert (tmp_path / "run/eval/test_step6_captions.json").is_file()
    weights = f"model.weights={tmp_path / 'run/checkpoints/step_6'}"
    run("examples/custom_model.py", "--eval-only", weights, f"output_dir={tmp_path / 'eval'}",
        cache=xe_run / "cache")  # fmt: skip
    scored = json.loads((tmp_path / "eval/eval/val_step0.json").read_text())["metrics"]
    trained = json.loads((tmp_path / "run/eval/val_step6.json").read_text())["metrics"]
    assert scored == pytest.approx(trained)


def sweep_trial_command(sweep: dict, chosen: list[str]) -> list[str]:
    """The command a W&B agent runs for one trial: the sweep's `command` with W&B's macros."""
    macros = {
        "${env}": [],  # the agent runs it with its environment (WANDB_* variables)
        "${interpreter}": [sys.executable],
        "${program}": [sweep["program"]],
        "${args_no_hyphens}": chosen,
    }
    return [part for item in sweep["command"] for part in macros.get(item, [item])]


def test_example_wandb_sweep_runs_a_trial_offline_in_its_own_output_dir(xe_run, tmp_path):
    """One trial of examples/wandb_sweep.yaml as the agent starts it, with W&B offline: its own
    output_dir, the sweep's metric under W&B's name, and the caption sample table."""
    sweep = yaml.safe_load((REPO / "examples/wandb_sweep.yaml").read_text())
    chosen = []
    for key, spec in sweep["parameters"].items():
        value = spec["values"][0] if "values" in spec else spec["min"]
        if key == "model.transformer.d_model":
            value = 32  # keep the tiny size (still one of the swept keys)
        chosen.append(f"{key}={value}")
    chosen += [*TINY, f"data.cache_dir={xe_run / 'cache'}"]
    (tmp_path / "recipes").symlink_to(REPO / "recipes")  # the agent runs from the repository
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_SWEEP_ID": "s1"}
    proc = subprocess.run(
        sweep_trial_command(sweep, chosen),
        env=subprocess_env(**env, WANDB_RUN_ID="r1", WANDB_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output/sweeps/s1/r1"
    assert (out / "eval" / "val_step6.json").is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["logging"]["wandb"]["project"] == sweep["project"]
    assert config["optim"]["lr"] == sweep["parameters"]["optim.lr"]["min"]
    (record_file,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    records = record_file.read_bytes()
    assert sweep["metric"]["name"].encode() in records  # eval/val/CIDEr
    assert b"eval/val/samples" in records


def test_coco_config_parses_and_builds_its_model_on_2048d_features(tmp_path):
    from xmodaler_accel import load_config
    from xmodaler_accel.data import build_synthetic, load_tokenizer, synthetic_dir
    from xmodaler_accel.tasks.captioning import (
        CAPTION_DEFAULTS,
        captioner_from_config,
        load_scst_config,
    )

    cfg = load_config(REPO / "recipes/coco.yaml", defaults=CAPTION_DEFAULTS)
    params = dict(num_train=8, num_val=4, num_test=4, feat_dim=2048)
    data = build_synthetic(tmp_path, **params)
    model = captioner_from_config(
        cfg, load_tokenizer(synthetic_dir(tmp_path, **params)), data["train"]
    )
    assert sum(p.numel() for p in model.parameters()) > 40_000_000  # d512, 6+6 layers
    assert cfg.lr_scheduler.name == "noam" and cfg.train.clip_grad.mode == "value"
    assert cfg.decode.beam_size == 2
    scst = load_scst_config(REPO / "recipes/coco.yaml", ["model.weights=xe.safetensors"])
    assert (scst.output_dir, scst.train.epochs, scst.train.batch_size) == (
        "output/coco_scst",
        30,
        16,
    )
    assert (scst.optim.lr, scst.lr_scheduler.name, scst.eval.every_epochs) == (1e-5, "constant", 1)
    assert scst.train.clip_grad.mode == "value" and scst.decode.beam_size == 2
