"""The porting path as an X-modaler user runs it (issue 15): its config through the port
command, its data through the command the converted config prints, its checkpoint as
`model.weights=`, then `recipes/xe.py --eval-only` writes the captions X-modaler's evaluator
produced (the fixture's beam-2 outputs, DECODE_STRATEGY.BEAM_SIZE 2)."""

import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, subprocess_env
from xmodaler_accel.data import ImageDataset, open_dataset
from xmodaler_accel.data.xmodaler import read_vocabulary
from xmodaler_accel.tasks.captioning import image_collate, load_caption_config

TRANSFORMER = FIXTURES / "xmodaler_transformer"
TEST_IMAGE = 100550  # the test image kept in fixtures/xmodaler_data: row 0 of the fixture's outputs


def _run(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _data_command(converted: str, output) -> list[str]:
    """The data command the converted config prints, writing to `output`."""
    line = next(x for x in converted.splitlines() if "xmodaler_accel.data.convert" in x)
    args = shlex.split(line.lstrip("# "))
    args[args.index("--output") + 1] = str(output)
    assert args[:3] == ["python", "-m", "xmodaler_accel.data.convert"]
    return [sys.executable, *args[1:]]


@pytest.fixture(scope="module")
def ported(tmp_path_factory) -> dict:
    """Steps 1-2 of a port: the converted config and the converted data."""
    tmp = tmp_path_factory.mktemp("port")
    # 1. The config X-modaler resolved for this model (its OUTPUT_DIR/config.yaml), converted.
    config = tmp / "ours.yaml"
    _run([sys.executable, "-m", "xmodaler_accel.port", "config",
          str(TRANSFORMER / "config.yaml"), "--output", str(config)])  # fmt: skip
    # 2. Its data: X-modaler resolves paths against its working directory (the fixtures folder).
    data = tmp / "data"
    _run(_data_command(config.read_text(), data), cwd=FIXTURES)
    return {"config": config, "data": data, "tmp": tmp}


def test_converted_data_and_config_feed_the_model_what_xmodalers_mapper_fed_it(ported):
    """Row 0 the mean of the 49 regions kept, then those regions, all unmasked: bitwise."""
    cfg = load_caption_config(ported["config"], [f"data.source={ported['data']}"])
    test = ImageDataset(open_dataset(cfg)["test"])
    (row,) = [i for i in range(len(test)) if test[i]["image_id"] == TEST_IMAGE]
    batch = image_collate(cfg)([test[row]])
    xmodaler = load_file(TRANSFORMER / "inputs.safetensors")
    assert torch.equal(batch["features"][0], xmodaler["att_feats"][0])
    assert batch["region_mask"][0].tolist() == xmodaler["att_masks"][0].bool().tolist()


def test_xmodaler_config_data_and_checkpoint_reproduce_its_evaluator_captions(ported):
    # 3. Its checkpoint as its trainer writes it (model + trainer state).
    checkpoint = ported["tmp"] / "model_final.pth"
    state = torch.load(TRANSFORMER / "model.pth", weights_only=True)
    torch.save({"model": state, "trainer": {"iteration": 29}, "iteration": 29}, checkpoint)
    # 4. Evaluate. The fixture's config evaluates no split (DATASETS.TEST ''), and the cut data
    # keeps 2 of its 8 training images (an epoch of TRAIN_BATCH_SIZE 8 would be empty).
    out = ported["tmp"] / "out"
    _run([sys.executable, str(REPO / "recipes/xe.py"), "--config", str(ported["config"]),
          "--eval-only", f"model.weights={checkpoint}", f"data.source={ported['data']}",
          f"output_dir={out}", "eval.splits=[test]", "train.batch_size=2"])  # fmt: skip

    (captions_file,) = (out / "eval").glob("test_step*_captions.json")
    captions = {row["image_id"]: row["caption"] for row in json.loads(captions_file.read_text())}
    words = read_vocabulary(FIXTURES / "xmodaler_data" / "vocabulary.txt")
    best = load_file(TRANSFORMER / "outputs.safetensors")["beam2_ids"][0, 0].tolist()
    expected = " ".join(words[i] for i in best[: best.index(0)])
    assert expected.startswith("w003 w001")  # the fixture README's sentence
    assert captions == {TEST_IMAGE: expected}
