"""Captioning new images end to end, offline: rendered scenes -> a tiny random ViT's features ->
a tiny XE run -> recipes/caption_images.py writes one caption per image."""

import json
import runpy
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from xmodaler_accel.data.backbone import save_random_backbone
from xmodaler_accel.data.image_folder import convert_image_folder
from xmodaler_accel.data.render import ANNOTATIONS_FILE, write_rendered_scenes
from xmodaler_accel.data.synthetic import SyntheticConfig

SIZE = 48  # 3 x 3 patches of 16 pixels: one per cell of the scenes' grid
TINY = [
    "model.transformer.d_model=32",
    "model.transformer.num_heads=2",
    "model.transformer.ffn_dim=64",
    "model.transformer.num_encoder_layers=1",
    "model.transformer.num_decoder_layers=1",
    "train.batch_size=4",
    "train.max_steps=2",
    "checkpoint.every=2",
    "eval.every=0",
    "decode.max_len=8",
]


def python(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def caption_images(monkeypatch, *args):
    """recipes/caption_images.py run in this process (as `python recipes/caption_images.py`)."""
    script = REPO / "recipes" / "caption_images.py"
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    runpy.run_path(str(script), run_name="__main__")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of rendered scenes with random-ViT features, and a 2-step XE run on it."""
    root = tmp_path_factory.mktemp("caption_images")
    config = SyntheticConfig(num_train=12, num_val=2, num_test=4)
    annotations = write_rendered_scenes(root / "rendered", config, size=SIZE)
    backbone = save_random_backbone(root / "backbone", image_size=SIZE, hidden_size=32)
    convert_image_folder(
        root / "rendered",
        root / "store",
        backbone=backbone,
        annotations=annotations,
        min_count=1,
        progress=False,
    )
    proc = python(
        REPO / "recipes/xe.py",
        "--config",
        REPO / "recipes/synthetic.yaml",
        *TINY,
        f"data.source={root / 'store'}",
        f"output_dir={root / 'xe'}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (root / "rendered" / ANNOTATIONS_FILE).is_file()
    return root


def test_captions_every_image_once_in_order_with_the_runs_newest_checkpoint(
    trained, monkeypatch, capsys
):
    """A file and a folder (its images sorted by name): one caption each, in order, as JSON and
    as a console table; the backbone is the one the store's meta.json names."""
    folder = trained / "new"
    folder.mkdir()
    for image in sorted((trained / "rendered" / "images").glob("test_*.png"))[::-1]:
        (folder / f"new_{image.name}").write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not an image: left out of a folder")
    single = trained / "rendered" / "images" / "val_000001.png"
    output = trained / "captions.json"
    caption_images(
        monkeypatch,
        "--config",
        trained / "xe" / "config.yaml",
        "--images",
        single,
        folder,
        "--output",
        output,
        "--device",
        "cpu",
    )
    out, err = capsys.readouterr()
    rows = json.loads(output.read_text())
    expected = [single, *sorted(folder.glob("*.png"))]
    assert len(expected) == 5
    assert [row["image"] for row in rows] == [str(p) for p in expected]
    assert all(isinstance(row["caption"], str) and row["caption"] for row in rows)
    table = out.splitlines()
    assert table[0].split() == ["image", "caption"] and len(table) == 1 + len(rows)
    assert "step_2" in err  # the newest checkpoint of the run's output_dir


def test_an_unreadable_image_is_one_error_line_naming_it(trained, tmp_path, monkeypatch, capsys):
    """Status 2 and no JSON (here with --backbone and model.weights given)."""
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    with pytest.raises(SystemExit) as stopped:
        caption_images(
            monkeypatch,
            "--config",
            trained / "xe" / "config.yaml",
            "--images",
            broken,
            f"--backbone={trained / 'backbone'}",
            "--output",
            tmp_path / "none.json",
            f"model.weights={trained / 'xe' / 'checkpoints' / 'step_2'}",
        )
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {broken}")
    assert not (tmp_path / "none.json").exists()


def test_help_answers_without_torch():
    proc = python("-X", "importtime", REPO / "recipes/caption_images.py", "--help")
    assert proc.returncode == 0 and "--backbone" in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "xmodaler_accel" not in imported
