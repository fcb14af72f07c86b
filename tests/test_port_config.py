"""X-modaler configs to ours: `python -m xmodaler_accel.port config` (issue 15, "Configs in")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xmodaler_accel.config import ConfigError, apply_section
from xmodaler_accel.port.__main__ import main
from xmodaler_accel.port.config import (
    EPOCH_KEYS,
    convert_config,
    read_xmodaler_yaml,
    render,
)
from xmodaler_accel.tasks.captioning.config import load_caption_config

REPO = Path(__file__).resolve().parents[1]
CAPTION = REPO / "tests/fixtures/xmodaler_configs/configs/image_caption"
TRANSFORMER, TRANSFORMER_RL = (
    CAPTION / "transformer/transformer.yaml",
    CAPTION / "transformer/transformer_rl.yaml",
)
UPDOWN, UPDOWN_RL = CAPTION / "updown/updown.yaml", CAPTION / "updown/updown_rl.yaml"
COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval

# The X-modaler keys each fixture config cannot carry over (the rest is mapped).
UNMAPPED = {
    "transformer/transformer.yaml": {"SOLVER.BASE_LR = 0.0005"},  # NoamLR ignores it
    "transformer/transformer_rl.yaml": {
        "SOLVER.BASE_LR = 0.0005",
        "MODEL.WEIGHTS = '{path_to_xe_model}' [transformer_rl.yaml]",  # a placeholder
    },
    "updown/updown.yaml": set(),
    "updown/updown_rl.yaml": {"MODEL.WEIGHTS = '{path_to_xe_model}' [updown_rl.yaml]"},
    "base_att_image_caption.yaml": set(),
}

# Where recipes/coco.yaml differs from converting transformer.yaml + transformer_rl.yaml, and
# why. Any other difference fails the test.
COCO_DIFFERENCES = {
    # coco.yaml also holds Up-Down's model (used with model.kind=updown only), as updown.yaml's
    # (test_coco_updown_section_is_updown_yamls_model).
    "model.updown.att_size": "coco.yaml's extra updown section",
    "model.updown.dropout": "coco.yaml's extra updown section",
    "model.updown.embed_dim": "coco.yaml's extra updown section",
    "model.updown.hidden_size": "coco.yaml's extra updown section",
    "model.updown.visual_dim": "coco.yaml's extra updown section",
    "model.updown.lstm_dropout": "coco.yaml's extra updown section",
    "model.updown.pred_dropout": "coco.yaml's extra updown section",
    "model.updown.use_boxes": "coco.yaml's extra updown section",
    # Ours, not X-modaler's: names, the dataset directory, the seed (X-modaler draws one: SEED -1)
    # and how many checkpoints to keep (X-modaler keeps all).
    "output_dir": "ours",
    "data.source": "ours",
    "seed": "ours",
    "checkpoint.keep": "ours",
}


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(ours, theirs) -> dict:
    a, b = _flat(ours.to_dict()), _flat(theirs.to_dict())
    return {
        k: (a.get(k), b.get(k))
        for k in set(a) | set(b)
        if not k.startswith("scst.") and a.get(k, "-") != b.get(k, "-")
    }


def test_base_chain_is_merged_base_first_child_wins():
    merged = read_xmodaler_yaml(TRANSFORMER_RL)
    assert merged["DATALOADER"]["TRAIN_BATCH_SIZE"] == 16  # child
    assert merged["DATALOADER"]["TEST_BATCH_SIZE"] == 32  # base
    assert merged["LR_SCHEDULER"] == {
        "NAME": "FixLR",
        "MODEL_SIZE": 512,
        "FACTOR": 1.0,
        "WARMUP": 10000,
    }
    assert "_BASE_" not in merged


@pytest.mark.parametrize("name", sorted(UNMAPPED))
def test_each_fixture_config_converts_and_names_its_unmapped_keys(name):
    conversion = convert_config(CAPTION / name)
    assert set(conversion.unmapped) == UNMAPPED[name]
    text = render(conversion)
    assert yaml.safe_load(text) == conversion.config
    for key in UNMAPPED[name]:
        assert key in text  # listed in the file too


def test_a_resolved_config_reports_only_what_asks_for_something(tmp_path):
    """X-modaler writes every key into OUTPUT_DIR/config.yaml; keys of other tasks and options
    left at X-modaler's defaults are not reported, the same keys set otherwise are."""
    resolved = REPO / "tests/fixtures/xmodaler_transformer/config.yaml"
    assert set(convert_config(resolved).unmapped) == {"SOLVER.BASE_LR = 0.0005"}
    changed = yaml.safe_load(resolved.read_text())
    changed["MODEL"]["BERT"]["LAYER_DROP"] = 0.1
    changed["DATALOADER"]["RELATION_FILE"] = "relations.pkl"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert set(convert_config(path).unmapped) == {
        "SOLVER.BASE_LR = 0.0005",
        "MODEL.BERT.LAYER_DROP = 0.1",
        "DATALOADER.RELATION_FILE = 'relations.pkl'",
    }


def test_scheduled_sampling_only_where_xmodaler_applies_it():
    """X-modaler's SS_PROB reaches RnnAttEncoderDecoder (Up-Down) only."""
    transformer = convert_config(TRANSFORMER).config["train"]["scheduled_sampling"]
    updown = convert_config(UPDOWN).config["train"]["scheduled_sampling"]
    assert transformer["max_prob"] == 0.0 and updown["max_prob"] == 0.25


def test_transformer_maps_every_number():
    cfg = convert_config(TRANSFORMER).config
    assert cfg["train"]["batch_size"] == 8 and cfg["eval"]["batch_size"] == 32
    assert cfg["train"]["clip_grad"] == {"mode": "value", "max": 0.1}
    assert cfg["lr_scheduler"] == {
        "name": "noam",
        "model_size": 512,
        "factor": 1.0,
        "warmup_steps": 10000,
    }
    assert cfg["optim"]["lr"] == 1.0  # ours scales optim.lr by Noam's factor
    assert cfg["model"]["transformer"]["d_model"] == 512
    assert cfg["model"]["transformer"]["use_boxes"] is False  # LOCATION_SIZE 0
    assert cfg["decode"] == {"beam_size": 2, "max_len": 20}
    # Epochs are X-modaler's unit: by default the epoch keys (see EPOCH_KEYS).
    assert cfg["train"]["epochs"] == 30
    assert cfg["eval"]["every_epochs"] == 1 and cfg["checkpoint"]["every_epochs"] == 1
    assert EPOCH_KEYS["SOLVER.EPOCH"] == "train.epochs"


def test_updown_maps_its_sizes_and_loss():
    cfg = convert_config(UPDOWN).config
    assert cfg["model"]["kind"] == "updown"
    assert cfg["model"]["updown"] == {
        "hidden_size": 1024,
        "embed_dim": 1024,
        "visual_dim": 1024,
        "att_size": 512,
        "dropout": 0.5,
        "lstm_dropout": 0.0,
        "pred_dropout": 0.5,
        "use_boxes": False,
    }
    assert cfg["model"]["label_smoothing"] == 0.0  # CrossEntropy
    assert cfg["lr_scheduler"] == {"name": "step", "gamma": 0.8, "step_size_epochs": 3}
    steps = convert_config(UPDOWN, train_images=800).config
    assert steps["lr_scheduler"]["step_size"] == 3 * 100  # STEP_SIZE epochs of 800 // 8 steps


def test_rl_config_becomes_rl_and_scst_sections():
    alone = convert_config(TRANSFORMER_RL)
    paired = convert_config(TRANSFORMER, rl=TRANSFORMER_RL)
    assert alone.config == paired.config
    cfg = alone.config
    assert cfg["rl"] == {
        "sampler": "sample",
        "baseline": "greedy",
        "samples_per_image": 5,
        "cider_weight": 1.0,
        "bleu_weight": 0.0,
    }
    assert cfg["scst"] == {
        "output_dir": "output/transformer_rl",
        "train": {"batch_size": 16},
        "optim": {"lr": 1e-5},
        "lr_scheduler": {"name": "constant", "warmup_steps": 0},
    }
    assert cfg["train"]["batch_size"] == 8  # the XE config stays XE


def test_coco_yaml_is_transformer_yaml_up_to_documented_differences(tmp_path):
    out = tmp_path / "converted.yaml"
    assert (
        main(["config", str(TRANSFORMER), "--rl", str(TRANSFORMER_RL), "--output", str(out)]) == 0
    )
    ours, coco = load_caption_config(out), load_caption_config(REPO / "recipes/coco.yaml")
    xe = _differences(ours, coco)
    scst = _differences(apply_section(ours, "scst"), apply_section(coco, "scst"))
    assert set(xe) | set(scst) == set(COCO_DIFFERENCES), (xe, scst)
    assert coco.train.epochs == 30 and coco.eval.every_epochs == coco.checkpoint.every_epochs == 1


def test_coco_updown_section_is_updown_yamls_model(tmp_path):
    out = tmp_path / "converted.yaml"
    assert main(["config", str(UPDOWN), "--output", str(out)]) == 0
    ours = load_caption_config(out).model.updown
    coco = load_caption_config(REPO / "recipes/coco.yaml").model.updown
    assert ours == coco


def test_epoch_form_loads(tmp_path):
    out = tmp_path / "converted.yaml"
    assert main(["config", str(TRANSFORMER_RL), "--output", str(out)]) == 0
    assert load_caption_config(out).train.epochs == 30


@pytest.mark.parametrize("files", [(TRANSFORMER, None), (UPDOWN, UPDOWN_RL)])
def test_step_form_loads_as_a_caption_config(tmp_path, files):
    out = tmp_path / "converted.yaml"
    args = ["config", str(files[0]), "--train-images", "800", "--output", str(out)]
    assert main(args + (["--rl", str(files[1])] if files[1] else [])) == 0
    cfg = load_caption_config(out)
    assert cfg.train.max_steps == 30 * 100
    if files[1]:
        assert apply_section(cfg, "scst").train.max_steps == 30 * 50


def test_main_writes_yaml_and_lists_unmapped_keys_on_stderr(tmp_path, capsys):
    out = tmp_path / "ours.yaml"
    assert main(["config", str(TRANSFORMER_RL), "--output", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "X-modaler keys not mapped (2):",
        "  SOLVER.BASE_LR = 0.0005: X-modaler's NoamLR ignores it (optim.lr 1.0 reproduces NoamLR)",
        "  MODEL.WEIGHTS = '{path_to_xe_model}' [transformer_rl.yaml]: a placeholder; give "
        "model.weights=<checkpoint> (SCST: the newest XE one)",
    ]
    assert yaml.safe_load(out.read_text())["model"]["kind"] == "transformer"


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("a: [1, 2", "invalid YAML"),
        ("_BASE_: missing.yaml\n", "missing.yaml"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_file(tmp_path, capsys, content, expected):
    path = tmp_path / "x.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        convert_config(path)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: X-modaler config ") and len(err.strip().splitlines()) == 1
    assert expected in err


def test_cli_runs_as_a_module(tmp_path):
    out = tmp_path / "ours.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmodaler_accel.port",
            "config",
            str(TRANSFORMER_RL),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SOLVER.BASE_LR = 0.0005" in result.stderr
    assert yaml.safe_load(out.read_text())["scst"]["optim"] == {"lr": 1e-5}
