"""The `images` converter: a folder of images + captions -> backbone grid features in the store.

A tiny random ViT (32 px, 8 px patches: 16 regions of width 32) keeps every extraction fast; ten
images of mixed sizes, formats and one EXIF rotation are cut into chunks of 3 (4 chunks).
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image, ImageOps

from conftest import BIN, REPO, subprocess_env
from xmodaler_accel.data.backbone import (
    BackboneFeatures,
    BadImageError,
    grid_boxes,
    load_image,
    save_random_backbone,
)
from xmodaler_accel.data.collate import collate_images
from xmodaler_accel.data.convert import main as convert_main
from xmodaler_accel.data.datasets import ImageDataset
from xmodaler_accel.data.extraction import DIE_AFTER_CHUNKS_ENV
from xmodaler_accel.data.image_folder import work_dir

NUM_IMAGES = 10
EXIF_ROTATED = "im004.jpg"  # stored 90 degrees turned, with EXIF orientation 6 to undo it
SETTINGS = ["--chunk-images", "3", "--batch-size", "2", "--workers", "0", "--min-count", "1"]


def write_images(folder: Path, count: int) -> list[dict]:
    """Random images of several sizes under `folder/sub`, and their Karpathy entries."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(20, 60, size=2))
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        name = f"im{i:03d}.{'png' if i % 2 else 'jpg'}"
        exif = Image.Exif()
        if name == EXIF_ROTATED:
            exif[0x0112] = 6
        Image.fromarray(pixels).save(folder / "sub" / name, exif=exif)
        words = ["a", ["red", "blue"][i % 2], "box", "on", ["grass", "sand", "snow"][i % 3]]
        entries.append(
            {
                "split": ["train", "train", "val", "test"][i % 4],
                "filepath": "sub",
                "filename": name,
                "cocoid": 100 + i,
                "sentences": [{"tokens": words, "raw": " ".join(words).capitalize() + "."}],
            }
        )
    return entries


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    backbone = save_random_backbone(root / "vit", image_size=32, patch_size=8, hidden_size=32)
    entries = write_images(root / "images", NUM_IMAGES)
    karpathy = root / "karpathy.json"
    karpathy.write_text(json.dumps({"images": entries}))
    return {"root": root, "backbone": backbone, "images": root / "images", "karpathy": karpathy}


def images_args(inputs: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "images",
        "--images",
        str(inputs["images"]),
        "--annotations",
        str(inputs["karpathy"]),
        "--backbone",
        str(inputs["backbone"]),
        "--output",
        str(output),
        *SETTINGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(inputs) -> Path:
    """One uninterrupted, single-process extraction."""
    output = inputs["root"] / "reference"
    assert convert_main(images_args(inputs, output)) == 0
    return output


def assert_same_store(left: Path, right: Path) -> None:
    """Same splits, same Arrow tables, same meta.json and tokenizer files."""
    a, b = load_from_disk(str(left)), load_from_disk(str(right))
    assert list(a) == list(b)
    for split in a:
        assert a[split].data.table.equals(b[split].data.table), split
    assert (left / "meta.json").read_text() == (right / "meta.json").read_text()
    for path in sorted((left / "tokenizer").iterdir()):
        assert path.read_bytes() == (right / "tokenizer" / path.name).read_bytes(), path.name


def direct_forward(backbone: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Patch tokens and pooled output of one image, straight from transformers."""
    from transformers import ViTImageProcessor, ViTModel

    model = ViTModel.from_pretrained(str(backbone)).eval()
    pixels = ViTImageProcessor.from_pretrained(str(backbone))(images=[image], return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=pixels["pixel_values"])
    return output.last_hidden_state[0, 1:].numpy(), output.pooler_output[0].numpy()


def test_extraction_equals_a_direct_forward_of_the_backbone(inputs, reference):
    store = load_from_disk(str(reference))
    meta = json.loads((reference / "meta.json").read_text())
    assert meta["kind"] == "images" and meta["backbone"] == str(inputs["backbone"].resolve())
    assert meta["feat_dim"] == 32 and meta["skipped_images"] == {}
    assert {split: len(store[split]) for split in store} == {"train": 6, "val": 2, "test": 2}
    seen = 0
    for split in store:
        table = ImageDataset(store[split])
        items, expected = [], []
        for row in range(len(table)):
            record = store[split][row]
            path = inputs["images"] / "sub" / f"im{record['image_id'] - 100:03d}"
            path = path.with_suffix(".jpg" if path.with_suffix(".jpg").exists() else ".png")
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            assert (record["image_w"], record["image_h"]) == image.size
            if path.name == EXIF_ROTATED:
                assert image.size == Image.open(path).size[::-1]
            patches, _ = direct_forward(inputs["backbone"], image)
            item = table[row]
            np.testing.assert_allclose(item["features"], patches, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(item["boxes"], grid_boxes(4, 4))
            assert record["num_regions"] == 16
            items.append(item)
            expected.append(patches)
            seen += 1
        batch = collate_images(items, max_feat_num=0)
        assert batch["region_mask"].all() and batch["region_mask"].shape == (len(items), 16)
        np.testing.assert_allclose(batch["features"].numpy(), np.stack(expected), atol=1e-5)
    assert seen == NUM_IMAGES


def test_global_feature_is_the_pooled_token_first_with_the_whole_image_box(inputs):
    image = load_image(inputs["images"] / "sub" / "im001.png")
    regions = BackboneFeatures(inputs["backbone"], global_feature=True)([image])[0]
    patches, pooled = direct_forward(inputs["backbone"], image)
    assert regions["features"].shape == (17, 32) and regions["features"].dtype == np.float32
    np.testing.assert_allclose(regions["features"][0], pooled, atol=1e-5)
    np.testing.assert_allclose(regions["features"][1:], patches, atol=1e-5)
    np.testing.assert_array_equal(regions["boxes"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(regions["boxes"][1:], grid_boxes(4, 4))


def test_load_image_applies_exif_orientation_and_names_a_bad_file(inputs, tmp_path):
    path = inputs["images"] / "sub" / EXIF_ROTATED
    raw = Image.open(path)
    assert load_image(path).size == raw.size[::-1] and load_image(path).mode == "RGB"
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.jpg"
    whole = (inputs["images"] / "sub" / "im000.jpg").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    for bad in (garbage, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(BadImageError, match=str(bad)) as err:
            load_image(bad)
        assert isinstance(err.value, ValueError)


def corrupt_inputs(inputs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The fixture's images and captions, with im003.png replaced by garbage."""
    images = tmp_path / "images"
    shutil.copytree(inputs["images"], images)
    (images / "sub" / "im003.png").write_bytes(b"\x89PNG but nothing after")
    return {**inputs, "images": images}


def test_a_corrupt_image_is_an_error_naming_it(inputs, tmp_path, capsys):
    bad = corrupt_inputs(inputs, tmp_path)
    output = tmp_path / "out"
    assert convert_main(images_args(bad, output)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ")  # one line, no traceback
    message = errors[0]
    assert str(bad["images"] / "sub" / "im003.png") in message and "--skip-bad" in message
    assert not output.exists()


def test_skip_bad_leaves_a_corrupt_image_out_and_names_it(inputs, tmp_path, caplog):
    bad = corrupt_inputs(inputs, tmp_path)
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert convert_main(images_args(bad, output, "--skip-bad")) == 0
    assert "im003.png" in caplog.text
    skipped = json.loads((output / "meta.json").read_text())["skipped_images"]
    assert list(skipped) == ["103"] and "im003.png" in skipped["103"]
    store = load_from_disk(str(output))
    assert 103 not in store["test"]["image_id"] and sum(map(len, store.values())) == 9
    assert not work_dir(output).exists()


def test_a_missing_image_is_named_before_extraction(inputs, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(inputs["images"], images)
    (images / "sub" / "im007.png").unlink()
    output = tmp_path / "out"
    assert convert_main(images_args({**inputs, "images": images}, output)) == 2
    assert "1 images not found" in capsys.readouterr().err
    assert not work_dir(output).exists()


def test_pairs_name_the_image_files(inputs, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    names = [f"sub/im{i:03d}.{'png' if i % 2 else 'jpg'}" for i in range(4)]
    lines = [f"{name}#{k}\ta box number {i}" for k in range(2) for i, name in enumerate(names)]
    pairs.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    args = images_args(inputs, output, "--wordpiece-size", "60")
    args[args.index("--annotations") : args.index("--annotations") + 2] = ["--pairs", str(pairs)]
    assert convert_main(args) == 0
    train = load_from_disk(str(output))["train"]
    assert train["image_key"] == [f"sub/im{i:03d}" for i in range(4)]
    assert train[0]["captions"] == ["a box number 0", "a box number 0"]


@pytest.mark.slow
def test_killed_extraction_reruns_to_the_same_store(inputs, reference, tmp_path, caplog):
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "xmodaler_accel.data.convert", *images_args(inputs, output)]
    killed = subprocess.run(
        cmd, env=subprocess_env(**{DIE_AFTER_CHUNKS_ENV: "1"}), capture_output=True, text=True
    )
    assert killed.returncode == 3, killed.stderr[-2000:]
    work = work_dir(output)
    assert not output.exists() and sorted(p.name for p in work.glob("chunk-*")) == [
        "chunk-000000.npz"
    ]
    (work / ".chunk-000001.npz.tmp-999").write_bytes(b"half a chunk")  # killed mid-write
    with caplog.at_level(logging.INFO):
        assert convert_main(images_args(inputs, output)) == 0
    assert "3 of its 4 chunks to extract" in caplog.text
    assert_same_store(reference, output)
    assert not work.exists()


@pytest.mark.slow
def test_two_processes_give_the_same_store_as_one(inputs, reference, tmp_path):
    output = tmp_path / "out"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["xmodaler_accel.data.convert", *images_args(inputs, output)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1 of 2: 2 of its 2 chunks" in done.stderr  # really two processes
    assert_same_store(reference, output)


def test_images_help_says_which_files_and_keys_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_main(["images", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    needs = ["filepath", "filename", "SPLIT=FILE", "--backbone", "--skip-bad", "EXIF"]
    for word in [*needs, "example:", "convert images --", "--float16", "torchrun"]:
        assert word in text, word


def test_a_max_feat_num_that_would_cut_the_patch_grid_is_refused(reference):
    """data.max_feat_num below the grid would keep its first rows only: an error naming both."""
    from xmodaler_accel.config import ConfigError
    from xmodaler_accel.data import open_dataset
    from xmodaler_accel.tasks.captioning import load_caption_config

    config = REPO / "recipes/synthetic.yaml"
    for limit in (0, 16):  # all regions, or exactly the 4x4 grid
        cfg = load_caption_config(
            config, [f"data.source={reference}", f"data.max_feat_num={limit}"]
        )
        assert len(open_dataset(cfg)["train"]) > 0
    cfg = load_caption_config(config, [f"data.source={reference}", "data.max_feat_num=4"])
    with pytest.raises(ConfigError, match=r"max_feat_num is 4 .* have 16 patch regions each"):
        open_dataset(cfg)
