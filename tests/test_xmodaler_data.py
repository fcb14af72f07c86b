"""X-modaler's captioning files into our store with its vocabulary ids (issue 15, "Data in")."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from xmodaler_accel.data import load_tokenizer
from xmodaler_accel.data.convert import main
from xmodaler_accel.data.errors import DataError
from xmodaler_accel.data.xmodaler import convert_xmodaler, read_vocabulary
from xmodaler_accel.masking import IGNORE_INDEX
from xmodaler_accel.tasks.captioning import CaptionDataset, collate_xe

FIXTURE = Path(__file__).resolve().parent / "fixtures/xmodaler_data"
FEATURES = FIXTURE / "features/up_down"
SPLITS = {"train": ["100000", "100001"], "val": ["100500"], "test": ["100550"]}


def _pkl(split: str) -> list[dict]:
    with open(FIXTURE / f"mscoco_caption_anno_{split}.pkl", "rb") as f:
        return pickle.load(f, encoding="bytes")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xm") / "coco"
    return convert_xmodaler(FIXTURE, FEATURES, out, progress=False)


def test_splits_and_image_ids_follow_the_pkls(store):
    data = load_from_disk(str(store))
    assert list(data) == ["train", "val", "test"]
    for split, ids in SPLITS.items():
        assert data[split]["image_key"] == ids
        assert data[split]["image_id"] == [int(i) for i in ids]


def test_caption_ids_are_xmodalers_tokens_and_target_ids(store):
    data, tokenizer = load_from_disk(str(store)), load_tokenizer(store)
    assert len(tokenizer) == 101  # MODEL.VOCAB_SIZE: '.' + 100 words
    for split in SPLITS:
        for row, entry in zip(data[split], _pkl(split), strict=True):
            encoded = tokenizer(row["captions"])["input_ids"]
            for ids, tokens, target in zip(
                encoded, entry["tokens_ids"], entry["target_ids"], strict=True
            ):
                n = len(ids) - 2  # words
                assert ids[:-1] == tokens[: n + 1].tolist() and tokens[n + 1 :].sum() == 0
                assert ids[1:] == target[: n + 1].tolist() and (target[n + 1 :] == -1).all()


def test_tokenizer_decodes_ids_to_xmodalers_words(store):
    tokenizer, words = load_tokenizer(store), read_vocabulary(FIXTURE / "vocabulary.txt")
    entry = _pkl("train")[0]
    for tokens in entry["tokens_ids"]:
        body = [int(i) for i in tokens[1:] if i]
        assert tokenizer.decode(tokens.tolist(), skip_special_tokens=True) == " ".join(
            words[i] for i in body
        )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 0)


def test_xe_batch_has_xmodalers_input_and_target_rows(store):
    data, tokenizer = load_from_disk(str(store)), load_tokenizer(store)
    batch = collate_xe([CaptionDataset(data["train"], tokenizer, seq_per_img=5)[0]])
    entry = _pkl("train")[0]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].tolist() == entry["tokens_ids"][:, :width].astype(np.int64).tolist()
    targets = batch["target_ids"].masked_fill(
        batch["target_ids"] == IGNORE_INDEX, -1
    )  # X-modaler: -1
    assert targets.tolist() == entry["target_ids"][:, :width].astype(np.int64).tolist()


def test_features_equal_the_npz_content(store):
    data = load_from_disk(str(store)).with_format("numpy")
    for split, ids in SPLITS.items():
        for row, key in zip(data[split], ids, strict=True):
            npz = np.load(FEATURES / f"{key}.npz")
            np.testing.assert_array_equal(row["features"], npz["features"])
            np.testing.assert_array_equal(row["cls_prob"], npz["cls_prob"])
            w, h = npz["image_w"][0], npz["image_h"][0]
            b = npz["boxes"]
            expected = np.stack(
                [b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                 (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)], axis=1
            )  # fmt: skip
            np.testing.assert_allclose(row["boxes"], expected, rtol=1e-6)
            assert (row["image_w"], row["image_h"]) == (w, h)


def test_evaluation_references_are_the_raw_coco_captions(store):
    data = load_from_disk(str(store))
    for split, name in (("val", "captions_val5k.json"), ("test", "captions_test5k.json")):
        annotations = json.loads((FIXTURE / name).read_text())["annotations"]
        for row in data[split]:
            raw = [a["caption"] for a in annotations if a["image_id"] == row["image_id"]]
            assert row["raw_captions"] == raw and len(raw) == 5


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "anno"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("features"))
    return folder


def test_out_of_vocabulary_id_is_an_error_naming_file_and_image(tmp_path):
    folder = _copy(tmp_path)
    entries = _pkl("val")
    entries[0]["tokens_ids"][2, 3] = 500
    with open(folder / "mscoco_caption_anno_val.pkl", "wb") as f:
        pickle.dump(entries, f)
    with pytest.raises(
        DataError, match=r"mscoco_caption_anno_val.pkl: image_id '100500'.*caption 2.*500"
    ):
        convert_xmodaler(folder, FEATURES, tmp_path / "out", progress=False)


def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path, capsys):
    folder = _copy(tmp_path)
    (folder / "mscoco_caption_anno_test.pkl").write_bytes(b"not a pickle")
    args = [
        "xmodaler",
        "--annotations",
        str(folder),
        "--features",
        str(FEATURES),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(args + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mscoco_caption_anno_test.pkl" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_converts_through_main_and_as_a_module(tmp_path):
    out = tmp_path / "a"
    args = ["xmodaler", "--annotations", str(FIXTURE), "--features", str(FEATURES), "--quiet"]
    assert main([*args, "--splits", "val", "--output", str(out)]) == 0
    assert list(load_from_disk(str(out))) == ["val"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmodaler_accel.data.convert",
            *args,
            "--output",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert load_from_disk(str(tmp_path / "b"))["train"].num_rows == 2
