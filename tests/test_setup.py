"""Set-up helpers: parser, launch, trackers (W&B offline), weights loading, eval coverage."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, run_toy, subprocess_env
from xmodaler_accel.checkpoint import CheckpointError, load_weights
from xmodaler_accel.config import Config, load_config
from xmodaler_accel.evaluation import EvaluationCountError, gather_predictions
from xmodaler_accel.optim import auto_scale_workers, lr_factor
from xmodaler_accel.setup import default_argument_parser


def test_argument_parser_takes_flags_and_trailing_overrides():
    args = default_argument_parser().parse_args(
        ["--config", "c.yaml", "--resume", "--num-gpus", "2", "train.max_steps=5", "optim.lr=0.1"]
    )
    assert args.config == "c.yaml" and args.resume and not args.eval_only
    assert args.num_gpus == 2 and args.opts == ["train.max_steps=5", "optim.lr=0.1"]
    late = default_argument_parser().parse_args(["--config", "c.yaml", "a.b=1", "--resume", "c=2"])
    assert late.resume and late.opts == ["a.b=1", "c=2"]


def test_launch_spawns_processes_that_form_one_group(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(FIXTURES / "launch_check.py"), str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = sorted(json.loads(p.read_text())["rank"] for p in tmp_path.glob("rank*.json"))
    assert infos == [0, 1]
    assert json.loads((tmp_path / "rank1.json").read_text())["world"] == 2


def test_run_writes_output_contract_and_wandb_offline(tmp_path):
    proc = run_toy(
        tmp_path,
        "train.max_steps=10",
        "logging.wandb.project=xa-test",
        "logging.tensorboard=true",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.yaml", "log.txt", "metrics.jsonl", "checkpoints"} <= {
        p.name for p in tmp_path.iterdir()
    }
    rerun = load_config(tmp_path / "config.yaml")  # the resolved config loads as is
    assert rerun.train.max_steps == 10 and rerun.logging.wandb.project == "xa-test"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb 0.2x+ keeps an offline run's config and history in its binary .wandb record file.
    (record_file,) = runs[0].glob("*.wandb")
    records = record_file.read_bytes()
    assert b"lr_scheduler.warmup_steps" in records  # a config key not on the command line
    assert b"train/abs_err" in records  # a metric logged by the writer, under train/
    assert list((tmp_path / "xa-test").glob("events.out.tfevents.*"))  # TensorBoard


def test_load_weights_reports_missing_and_unexpected_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    torch.save(
        {
            "model": {
                "0.weight": torch.zeros(2, 2),
                "0.bias": torch.zeros(2),
                "extra.w": torch.ones(1),
            }
        },
        tmp_path / "xmodaler.pth",
    )
    with pytest.raises(
        CheckpointError, match=r"missing keys: 1.weight, 1.bias; unexpected keys: extra.w"
    ):
        load_weights(model, tmp_path / "xmodaler.pth")
    load_weights(model, tmp_path / "xmodaler.pth", strict=False)
    assert torch.equal(model[0].weight, torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match=r"model.weights: file not found: .*nope.safetensors"):
        load_weights(model, tmp_path / "nope.safetensors")


class Evil:
    pass


def test_load_weights_refuses_pickled_objects(tmp_path):
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(torch.nn.Linear(1, 1), tmp_path / "evil.pt")


class OneProcess:
    num_processes = 1


def test_gather_predictions_checks_coverage_and_conflicts():
    acc = OneProcess()
    assert gather_predictions(acc, [1, 2, 2], ["a", "b", "b"], [1, 2]) == {1: "a", 2: "b"}
    with pytest.raises(EvaluationCountError, match=r"1 missing \(e.g. \[3\]\)"):
        gather_predictions(acc, [1, 2], ["a", "b"], [1, 2, 3])
    with pytest.raises(
        EvaluationCountError, match="sample 2 was predicted twice with different results"
    ):
        gather_predictions(acc, [1, 2, 2], ["a", "b", "c"], 2)
    with pytest.raises(EvaluationCountError, match="saw 2 distinct samples, the split has 3"):
        gather_predictions(acc, [1, 2], ["a", "b"], 3)


def test_auto_scale_workers_scales_lr_linearly():
    cfg = Config(
        {
            "train": {"auto_scale_workers": True, "grad_accum": 2, "reference_workers": 2},
            "optim": {"lr": 0.001},
        }
    )
    assert auto_scale_workers(cfg, world_size=4) == 4.0
    assert cfg.optim.lr == pytest.approx(0.004)
    cfg.train.auto_scale_workers = False
    assert auto_scale_workers(cfg, world_size=8) == 1.0


def test_noam_schedule_matches_xmodaler_formula():
    cfg = Config(
        {"lr_scheduler": {"name": "noam", "warmup_steps": 20000, "model_size": 512, "factor": 1.0}}
    )
    factor = lr_factor(cfg, max_steps=100)
    for n in (1, 100, 20000, 50000):  # X-modaler: d^-0.5 * min(n^-0.5, n * warmup^-1.5)
        assert factor(n - 1) == pytest.approx(512**-0.5 * min(n**-0.5, n * 20000**-1.5))
