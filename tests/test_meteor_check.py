"""METEOR (Java + pycocoevalcap's jar) is checked when the captioning evaluators are built, before
training: without them a run stops at start with one line saying what to install or which key to
change, instead of failing its first evaluation hours in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, subprocess_env
from xmodaler_accel.config import ConfigError
from xmodaler_accel.metrics import meteor as meteor_module
from xmodaler_accel.tasks.captioning.evaluation import check_caption_metrics

SMALL = [
    "data.synthetic.num_train=200",
    "data.synthetic.num_val=20",
    "data.synthetic.num_test=20",
    "data.synthetic.feat_dim=32",
    "model.transformer.d_model=32",
    "model.transformer.num_heads=2",
    "model.transformer.ffn_dim=64",
    "model.transformer.num_encoder_layers=1",
    "model.transformer.num_decoder_layers=1",
    "train.batch_size=8",
    "train.log_every=1",
    "eval.batch_size=20",
    "eval.splits=[val]",
    "decode.max_len=8",
    "train.max_steps=2",
    "eval.metrics=[bleu,meteor]",
]
ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1)


def run_xe(out: Path, cache: Path, path_env: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "recipes/xe.py"),
        "--config",
        str(REPO / "recipes/synthetic.yaml"),
    ]
    cmd += [*SMALL, f"data.cache_dir={cache}", f"output_dir={out}"]
    env = subprocess_env(PATH=path_env)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def path_without_java(tmp_path: Path) -> str:
    """PATH with every folder that holds `java` replaced by a copy (of links) without it."""
    dirs = []
    for i, folder in enumerate(os.environ["PATH"].split(os.pathsep)):
        if folder and (Path(folder) / "java").exists():
            shadow = tmp_path / f"path{i}"
            shadow.mkdir()
            for entry in Path(folder).iterdir():
                if entry.name != "java":
                    (shadow / entry.name).symlink_to(entry)
            folder = str(shadow)
        dirs.append(folder)
    path = os.pathsep.join(dirs)
    assert shutil.which("java", path=path) is None
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("meteor_cache")


def test_meteor_without_java_stops_the_recipe_before_training(tmp_path, cache):
    out = tmp_path / "run"
    proc = run_xe(out, cache, path_without_java(tmp_path))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "config key 'eval.metrics' includes meteor" in lines[0]
    assert "`java` is not on PATH: install a Java runtime" in lines[0]
    assert "eval.metrics=[bleu]" in lines[0]  # the configured metrics without meteor
    assert not (out / "checkpoints").exists() and not (out / "eval").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")
def test_meteor_with_java_runs_and_scores(tmp_path, cache):
    pytest.importorskip("pycocoevalcap")
    out = tmp_path / "run"
    proc = run_xe(out, cache, os.environ["PATH"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "eval" / "val_step2.json").read_text())["metrics"]
    assert 0 <= metrics["METEOR"] <= 1 and "Bleu_4" in metrics
    assert (out / "checkpoints" / "step_2").is_dir()


def test_missing_jar_says_to_install_pycocoevalcap(monkeypatch):
    monkeypatch.setattr(meteor_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as err:
        check_caption_metrics(ONE_PROCESS, ["bleu", "meteor", "rouge", "cider"])
    message = str(err.value)
    assert "(or pycocoevalcap)" in message and "[coco-eval]" in message
    assert message.endswith("eval.metrics=[bleu,rouge,cider]") and "\n" not in message


def test_java_that_does_not_start_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "java"
    broken.write_text("#!/bin/sh\necho 'Error: could not create the Java VM' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: str(broken))
    if meteor_module._find_jar()[0] is None:
        pytest.skip("pycocoevalcap is not installed")
    with pytest.raises(ConfigError, match="could not create the Java VM"):
        check_caption_metrics(ONE_PROCESS, ["meteor"])


def test_unknown_metric_is_refused_at_start_and_others_need_nothing(monkeypatch):
    with pytest.raises(
        ConfigError, match=r"'eval.metrics': unknown caption metric\(s\) \['cidr'\]"
    ):
        check_caption_metrics(ONE_PROCESS, ["bleu", "cidr"])
    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)  # no Java needed
    check_caption_metrics(ONE_PROCESS, ["bleu", "rouge", "cider"])
