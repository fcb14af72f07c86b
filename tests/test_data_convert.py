"""Converters to Arrow: round trips from fixtures made here, feature formats, every error."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict, load_from_disk

from xmodaler_accel.data import (
    EmptyCaptionError,
    FeatureFileNotFoundError,
    FeatureShapeError,
    ImageDataset,
    MalformedLineError,
    SplitWriter,
    UnknownSplitError,
    convert_karpathy,
    convert_pairs,
    convert_vcr,
    image_table_features,
    load_tokenizer,
    location_features,
    open_features,
    read_meta,
    read_pairs,
    read_vcr,
)
from xmodaler_accel.data.convert import main as convert_main

DIM = 16


def make_regions(rng: np.random.Generator, num: int, cls_dim: int | None = None) -> dict:
    boxes = np.sort(rng.uniform(0, 400, size=(num, 2, 2)), axis=1).reshape(num, 4)[:, [0, 2, 1, 3]]
    out = {
        "features": rng.standard_normal((num, DIM)).astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "image_w": np.int64(640),
        "image_h": np.int64(480),
    }
    if cls_dim:
        out["cls_prob"] = rng.dirichlet(np.ones(cls_dim), size=num).astype(np.float32)
    return out


def write_npz(folder: Path, keys: list[str], seed: int = 0, cls_dim: int | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    regions = {key: make_regions(rng, int(rng.integers(3, 9)), cls_dim) for key in keys}
    for key, arrays in regions.items():
        np.savez(folder / f"{key}.npz", **arrays)
    return regions


def sentence(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().rstrip(".").split()}


def karpathy_fixture(tmp_path: Path, cls_dim: int | None = None) -> tuple[Path, Path, dict]:
    images = [
        {
            "filename": f"COCO_{i}.jpg",
            "imgid": i,
            "cocoid": 100 + i,
            "split": split,
            "sentences": [],
        }
        for i, split in enumerate(["train", "train", "restval", "val", "val", "test"])
    ]
    for image in images:
        i = image["imgid"]
        image["sentences"] = [sentence(f"A dog number {i} runs."), sentence(f"The cat {i} sits!")]
    annotations = tmp_path / "dataset_coco.json"
    annotations.write_text(json.dumps({"images": images, "dataset": "coco"}))
    regions = write_npz(tmp_path / "feats", [str(100 + i) for i in range(6)], cls_dim=cls_dim)
    return annotations, tmp_path / "feats", regions


def test_karpathy_round_trip_keeps_features_boxes_and_captions(tmp_path):
    annotations, feats, regions = karpathy_fixture(tmp_path, cls_dim=5)
    out = convert_karpathy(annotations, feats, tmp_path / "out", min_count=1, progress=False)
    data = load_from_disk(str(out))
    assert isinstance(data, DatasetDict) and list(data) == ["train", "val", "test"]
    assert [len(data[s]) for s in data] == [3, 2, 1]  # restval folded into train
    assert data["train"]["image_id"] == [100, 101, 102]
    images = ImageDataset(data["train"])
    for row, key in enumerate(["100", "101", "102"]):
        item = images[row]
        np.testing.assert_array_equal(item["features"], regions[key]["features"])
        expected = location_features(regions[key]["boxes"], 640, 480)
        np.testing.assert_allclose(item["boxes"], expected, rtol=1e-6)
        np.testing.assert_array_equal(item["cls_prob"], regions[key]["cls_prob"])
    assert data["val"][0]["captions"] == ["a dog number 3 runs", "the cat 3 sits"]
    assert data["val"][0]["raw_captions"] == ["A dog number 3 runs.", "The cat 3 sits!"]
    tokenizer = load_tokenizer(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer("a dog runs")["input_ids"]) == [
        "[BOS]",
        "a",
        "dog",
        "runs",
        "[EOS]",
    ]
    meta = read_meta(out)
    assert meta["kind"] == "karpathy" and meta["feat_dim"] == DIM and meta["cls_dim"] == 5
    assert meta["num_rows"] == {"train": 3, "val": 2, "test": 1}
    assert data["train"].cache_files  # memory-mapped from the output directory


def test_float16_storage_and_small_chunks_give_same_rows(tmp_path):
    annotations, feats, regions = karpathy_fixture(tmp_path)
    out = convert_karpathy(
        annotations, feats, tmp_path / "f16", dtype="float16", chunk_bytes=1, progress=False
    )
    table = load_from_disk(str(out))["train"]
    assert table.data.table.column("features").num_chunks == 3  # one row per chunk
    features = ImageDataset(table)[1]["features"]
    assert features.dtype == np.float16
    np.testing.assert_array_equal(features, regions["101"]["features"].astype(np.float16))


def test_single_array_npz_is_features_only(tmp_path):
    annotations, feats, regions = karpathy_fixture(tmp_path)
    for key, arrays in regions.items():
        np.savez(feats / f"{key}.npz", arrays["features"])
    data = load_from_disk(str(convert_karpathy(annotations, feats, tmp_path / "o", progress=False)))
    item = ImageDataset(data["test"])[0]
    np.testing.assert_array_equal(item["features"], regions["105"]["features"])
    assert not item["boxes"].any()


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32)).decode()


def test_bottom_up_tsv_and_hdf5_readers_match_npz(tmp_path):
    h5py = pytest.importorskip("h5py")
    regions = write_npz(tmp_path / "npz", ["7", "8"], cls_dim=3)
    tsv = tmp_path / "feats.tsv"
    with open(tsv, "w") as handle:
        for key, r in regions.items():
            fields = [key, "640", "480", str(len(r["features"])), b64(r["boxes"])]
            handle.write("\t".join([*fields, b64(r["features"])]) + "\n")
    with h5py.File(tmp_path / "feats.hdf5", "w") as handle:  # meshed-memory layout
        for key, r in regions.items():
            handle[f"{key}_features"] = r["features"]
            handle[f"{key}_boxes"] = r["boxes"]
            handle[f"{key}_cls_prob"] = r["cls_prob"]
    with h5py.File(tmp_path / "groups.h5", "w") as handle:  # one group per image
        for key, r in regions.items():
            group = handle.create_group(key)
            group["features"], group["boxes"] = r["features"], r["boxes"]
            group.attrs["image_w"], group.attrs["image_h"] = 640, 480
    sources = (tsv, tmp_path / "feats.hdf5", tmp_path / "groups.h5", tmp_path / "npz")
    for source in sources:
        reader = open_features(source)
        assert sorted(reader.keys()) == ["7", "8"]
        got = reader.read("8")
        np.testing.assert_array_equal(got.features, regions["8"]["features"])
        np.testing.assert_array_equal(got.boxes, regions["8"]["boxes"])
    assert open_features(tsv).read("7").image_w == 640
    assert open_features(tmp_path / "groups.h5").read("7").image_h == 480
    assert open_features(tmp_path / "feats.hdf5").read("7").cls_prob.shape == (
        len(regions["7"]["features"]),
        3,
    )


def test_karpathy_from_several_tsv_files_via_cli(tmp_path):
    annotations, _, regions = karpathy_fixture(tmp_path)
    files = [tmp_path / "up_down.tsv.0", tmp_path / "up_down.tsv.1"]
    for k, key in enumerate(sorted(regions)):
        r = regions[key]
        fields = [key, "640", "480", str(len(r["features"])), b64(r["boxes"]), b64(r["features"])]
        with open(files[k % 2], "a") as handle:
            handle.write("\t".join(fields) + "\n")
    out = tmp_path / "tsv_out"
    argv = ["karpathy", "--annotations", str(annotations), "--output", str(out), "--quiet"]
    fields = ["--tsv-fields", "image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    assert convert_main([*argv, *fields, "--features", *map(str, files)]) == 0
    item = ImageDataset(load_from_disk(str(out))["val"])[1]
    np.testing.assert_array_equal(item["features"], regions["104"]["features"])
    expected = location_features(regions["104"]["boxes"], 640, 480)
    np.testing.assert_allclose(item["boxes"], expected, rtol=1e-6)
    assert read_meta(out)["feature_format"] == "BottomUpTSV"


def vcr_line(img: str, question: list, label: int = 1, **extra) -> str:
    item = {
        "question": question,
        "answer_choices": [["yes"], [[0], "is", "happy"], ["no"], ["maybe", [1, 0]]],
        "rationale_choices": [["because"], ["so"], [[1], "smiles"], ["why"]],
        "answer_label": label,
        "rationale_label": 2,
        "objects": ["person", "dog"],
        "img_fn": f"movie/{img}.jpg",
        "metadata_fn": f"movie/{img}.json",
        "annot_id": f"a-{img}",
        **extra,
    }
    return json.dumps(item)


def test_vcr_round_trip_expands_tags_and_links_regions(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            [
                vcr_line("img1", ["Why", "is", [0], "here", "?"]),
                vcr_line("img2", ["What", "does", [1, 0], "do", "?"], label=3),
                vcr_line("img1", ["Is", [1], "ok", "?"]),
            ]
        )
    )
    (tmp_path / "val.jsonl").write_text(vcr_line("img3", ["Who", "?"]) + "\n")
    regions = write_npz(tmp_path / "feats" / "movie", ["img1", "img2", "img3"])
    out = convert_vcr(
        [tmp_path / "train.jsonl", tmp_path / "val.jsonl"],
        tmp_path / "feats",
        tmp_path / "vcr",
        wordpiece_size=200,
        progress=False,
    )
    data = load_from_disk(str(out))
    assert list(data) == ["train", "val", "vcr_train", "vcr_val"]
    assert data["train"]["image_key"] == ["movie/img1", "movie/img2"]
    questions = data["vcr_train"]
    assert questions["image_row"] == [0, 1, 0]
    assert questions[1]["question"] == ["What", "does", "dog", "and", "person", "do", "?"]
    assert questions[1]["question_tags"] == [-1, -1, 1, -1, 0, -1, -1]
    assert questions[0]["answer_choices"][3] == ["maybe", "dog", "and", "person"]
    assert questions[0]["rationale_tags"][2] == [1, -1]
    assert questions["answer_label"] == [1, 3, 1]
    row = data["train"][1]
    np.testing.assert_array_equal(np.array(row["features"]), regions["img2"]["features"])
    assert read_meta(out)["image_key"] == "img_fn"


def test_conceptual_captions_files_convert_with_pretrain_yamls_command(tmp_path):
    """recipes/pretrain.yaml's awk line turns Google's `caption<TAB>url` into `image<TAB>caption`."""
    yaml_text = (Path(__file__).parents[1] / "recipes" / "pretrain.yaml").read_text()
    awk = next(ln for ln in yaml_text.splitlines() if "awk" in ln and "Train_GCC" in ln)
    command = awk.lstrip("# ").strip()
    (tmp_path / "Train_GCC-training.tsv").write_text(
        "a dog runs on the beach\thttp://example.com/a.jpg\nred bus, parked\thttp://x.org/b.jpg\n"
    )
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    write_npz(tmp_path / "feats", ["000000000", "000000001"])
    out = convert_pairs({"train": tmp_path / "cc_train.tsv"}, tmp_path / "feats", tmp_path / "cc",
                        wordpiece_size=120, progress=False)  # fmt: skip
    data = load_from_disk(str(out))
    assert data["train"]["image_id"] == [0, 1]
    assert data["train"][1]["captions"] == ["red bus parked"]


def test_pairs_round_trip_groups_captions_per_image(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "image_id\tcaption\n5.jpg#0\tA red bus.\n6.jpg#0\tTwo dogs play\n5.jpg#1\tA bus, parked.\n"
    )
    (tmp_path / "val.jsonl").write_text(json.dumps({"image_id": "7", "caption": "A cat"}) + "\n")
    write_npz(tmp_path / "feats", ["5", "6", "7"])
    out = convert_pairs(
        {"train": tmp_path / "train.tsv", "val": tmp_path / "val.jsonl"},
        tmp_path / "feats",
        tmp_path / "pairs",
        wordpiece_size=120,
        progress=False,
    )
    data = load_from_disk(str(out))
    assert data["train"]["image_id"] == [5, 6]
    assert data["train"][0]["captions"] == ["a red bus", "a bus parked"]
    assert data["val"][0]["captions"] == ["a cat"]
    tokenizer = load_tokenizer(out)
    assert tokenizer.cls_token == "[CLS]" and tokenizer.mask_token == "[MASK]"


def test_cli_converts_karpathy_and_reports_errors(tmp_path, capsys):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    out = tmp_path / "cli"
    argv = ["karpathy", "--annotations", str(annotations), "--features", str(feats)]
    assert convert_main([*argv, "--output", str(out), "--min-count", "1", "--quiet"]) == 0
    assert len(load_from_disk(str(out))["train"]) == 3
    assert convert_main([*argv, "--output", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main([*argv, "--output", str(out), "--quiet", "--overwrite"]) == 0


def test_split_writer_rolls_over_shards_that_load_as_one_table(tmp_path):
    schema = image_table_features(4, captions=False)
    writer = SplitWriter(tmp_path / "split", schema, chunk_bytes=1, shard_bytes=1)
    rng = np.random.default_rng(0)
    rows = [
        {
            "image_id": i,
            "image_key": str(i),
            "image_w": 10,
            "image_h": 10,
            "num_regions": i + 1,
            "features": rng.standard_normal((i + 1, 4)).astype(np.float32),
            "boxes": np.zeros((i + 1, 5), np.float32),
        }
        for i in range(4)
    ]
    for row in rows:
        writer.add(row)
    assert writer.close() == 4
    assert sorted(p.name for p in (tmp_path / "split").glob("*.arrow")) == [
        f"data-0000{i}.arrow" for i in range(4)
    ]
    table = load_from_disk(str(tmp_path / "split"))
    images = ImageDataset(table)
    for row in rows:
        np.testing.assert_array_equal(images[row["image_id"]]["features"], row["features"])
    with pytest.raises(ValueError, match=r"lacks columns \['boxes'\]"):
        writer.add({k: v for k, v in rows[0].items() if k != "boxes"})


def test_cli_builds_the_synthetic_set(tmp_path, capsys):
    argv = ["synthetic", "--output", str(tmp_path), "--num-train", "6", "--num-val", "2"]
    assert convert_main([*argv, "--num-test", "2", "--feat-dim", "32"]) == 0
    path = Path(capsys.readouterr().out.strip())
    data = load_from_disk(str(path))
    assert [len(data[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert read_meta(path)["config"]["feat_dim"] == 32


# ----------------------------------------------------------------------------- errors
def test_missing_feature_file_names_the_path_and_leaves_no_output(tmp_path):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    (feats / "104.npz").unlink()
    out = tmp_path / "out"
    expected = rf"missing feature file {feats / '104.npz'} for image '104'"
    with pytest.raises(FeatureFileNotFoundError, match=expected):
        convert_karpathy(annotations, feats, out, progress=False)
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []  # the temporary directory is gone too


def test_wrong_feature_shape_says_got_and_expected(tmp_path):
    annotations, feats, regions = karpathy_fixture(tmp_path)
    np.savez(feats / "103.npz", features=np.zeros((4, DIM + 1), np.float32))
    match = (
        r"feats/103.npz \(image '103'\): features have shape \(4, 17\), expected \(N, 16\); "
        r"16 is the width of 4 of the first 5 images \(pass --feat-dim"
    )
    with pytest.raises(FeatureShapeError, match=match):
        convert_karpathy(annotations, feats, tmp_path / "out", progress=False)
    np.savez(feats / "103.npz", features=regions["103"]["features"], boxes=np.zeros((2, 4)))
    with pytest.raises(FeatureShapeError, match=r"boxes have shape \(2, 4\), expected \(\d+, 4\)"):
        convert_karpathy(annotations, feats, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_npz_names_the_file(tmp_path):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    (feats / "102.npz").write_bytes(b"not a zip file")
    with pytest.raises(FeatureShapeError, match=r"102.npz: cannot read features for image '102'"):
        convert_karpathy(annotations, feats, tmp_path / "out", progress=False)


def test_feat_dim_option_checks_every_image(tmp_path):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    match = r"100.npz \(image '100'\): features have shape \(\d+, 16\), expected \(N, 2048\) as set"
    with pytest.raises(FeatureShapeError, match=match):
        convert_karpathy(annotations, feats, tmp_path / "out", feat_dim=2048, progress=False)


def test_empty_caption_names_file_image_and_sentence(tmp_path):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    data = json.loads(annotations.read_text())
    data["images"][4]["sentences"][1] = {"raw": " ?! ", "tokens": []}
    annotations.write_text(json.dumps(data))
    match = (
        r"dataset_coco.json: image 'COCO_4.jpg' \(imgid 4\) sentence 1: caption ' \?! ' is empty"
    )
    with pytest.raises(EmptyCaptionError, match=match):
        convert_karpathy(annotations, feats, tmp_path / "out", progress=False)
    pairs = tmp_path / "train.tsv"
    pairs.write_text("5.jpg#0\tA bus.\n5.jpg#1\t -- \n")
    match = r"train.tsv:2 \(image '5'\): caption ' -- ' is empty after tokenisation"
    with pytest.raises(EmptyCaptionError, match=match):
        convert_pairs({"train": pairs}, feats, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_split_names_the_image(tmp_path):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    data = json.loads(annotations.read_text())
    data["images"][2]["split"] = "dev"
    annotations.write_text(json.dumps(data))
    match = r"image 'COCO_2.jpg' \(imgid 2\) has split 'dev'; expected train, val, test or restval"
    with pytest.raises(UnknownSplitError, match=match):
        convert_karpathy(annotations, feats, tmp_path / "out", progress=False)
    with pytest.raises(UnknownSplitError, match=r"unknown split 'dev'"):
        convert_pairs({"dev": annotations}, feats, tmp_path / "out", progress=False)


def test_malformed_json_line_gives_line_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(vcr_line("img1", ["Why", "?"]) + "\n\n" + '{"question": ["oops"\n')
    write_npz(tmp_path / "feats" / "movie", ["img1"])
    with pytest.raises(MalformedLineError, match=r"train.jsonl:3: malformed JSON line"):
        convert_vcr([path], tmp_path / "feats", tmp_path / "out", progress=False)
    path.write_text(vcr_line("img1", ["Why", [5], "?"]) + "\n")
    with pytest.raises(MalformedLineError, match=r"train.jsonl:1: tag 5 does not index the 2"):
        convert_vcr([path], tmp_path / "feats", tmp_path / "out", progress=False)
    pairs = tmp_path / "cc.jsonl"
    pairs.write_text('{"image_id": "1", "caption": "a"}\n{"image_id": 2, "capt\n')
    with pytest.raises(MalformedLineError, match=r"cc.jsonl:2: malformed JSON line"):
        convert_pairs({"train": pairs}, tmp_path / "feats", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_vcr_objects_without_regions_are_an_error(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(vcr_line("img1", ["Why", "?"], annot_id="val-7") + "\n")
    folder = tmp_path / "feats" / "movie"
    folder.mkdir(parents=True)
    np.savez(folder / "img1.npz", features=np.ones((1, DIM), np.float32))
    match = r"vcr_val question val-7: 2 objects but image 'movie/img1' has 1 regions"
    with pytest.raises(FeatureShapeError, match=match):
        convert_vcr([path], tmp_path / "feats", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_image_in_tsv_names_image_and_files(tmp_path):
    tsv = tmp_path / "f.tsv"
    tsv.write_text("1\t10\t10\t1\t" + base64.b64encode(np.zeros(4, np.float32)).decode() + "\t")
    with pytest.raises(FeatureFileNotFoundError, match=r"image '2' not found in feature files"):
        open_features(tsv).read("2")
    with pytest.raises(FeatureFileNotFoundError, match=r"feature path .*nope.h5 does not exist"):
        open_features(tmp_path / "nope.h5")


# ----------------------------------------------------------------------------- feature width
def cli_error(argv: list[str], capsys) -> str:
    """Run the converter CLI expecting a data error: exit 2 and one line on stderr."""
    assert convert_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_first_image_of_wrong_width_is_named_not_the_next(tmp_path, capsys):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    np.savez(feats / "100.npz", features=np.ones((3, DIM + 1), np.float32))
    argv = ["karpathy", "--annotations", str(annotations), "--features", str(feats)]
    err = cli_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert (
        f"{feats / '100.npz'} (image '100'): features have shape (3, 17), expected (N, 16)" in err
    )
    assert "16 is the width of 4 of the first 5 images (pass --feat-dim" in err
    assert "'101'" not in err
    # the image after the probed ones is checked against the same, explained, width
    np.savez(feats / "100.npz", features=np.ones((3, DIM), np.float32))
    np.savez(feats / "105.npz", features=np.ones((2, DIM + 1), np.float32))
    err = cli_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "105.npz (image '105'): features have shape (2, 17), expected (N, 16); 16 is" in err
    assert not (tmp_path / "out").exists()


def test_feature_width_with_no_majority_asks_for_feat_dim(tmp_path, capsys):
    annotations, feats, _ = karpathy_fixture(tmp_path)
    for key, dim in {"100": 16, "101": 17, "102": 18, "103": 17}.items():
        np.savez(feats / f"{key}.npz", features=np.ones((3, dim), np.float32))
    argv = ["karpathy", "--annotations", str(annotations), "--features", str(feats)]
    err = cli_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "cannot tell the feature width: the first 5 images disagree" in err
    assert f"{feats / '101.npz'} (image '101') has 17, {feats / '102.npz'} (image '102')" in err
    assert "pass --feat-dim" in err
    argv += ["--feat-dim", "17", "--output", str(tmp_path / "out")]
    err = cli_error(argv, capsys)  # given, the width is checked and its origin said
    assert "100.npz (image '100'): features have shape (3, 16), expected (N, 17) as set by" in err


def test_width_probe_reads_each_image_once(tmp_path, monkeypatch):
    from xmodaler_accel.data import converters

    annotations, feats, _ = karpathy_fixture(tmp_path)
    reads: list[str] = []
    real_open = converters.open_features

    def counting_open(*args, **kwargs):
        reader = real_open(*args, **kwargs)
        read = reader.read
        reader.read = lambda key: reads.append(key) or read(key)
        return reader

    monkeypatch.setattr(converters, "open_features", counting_open)
    convert_karpathy(annotations, feats, tmp_path / "out", progress=False)
    assert sorted(reads) == [str(100 + i) for i in range(6)]


# ----------------------------------------------------------------------------- CLI errors
def _karpathy_images(tmp_path: Path, **change) -> Path:
    annotations, _, _ = karpathy_fixture(tmp_path)
    data = json.loads(annotations.read_text())
    data["images"][1].update(change)
    annotations.write_text(json.dumps(data))
    return annotations


def _bad_annotations(tmp_path: Path, case: str) -> tuple[Path, str]:
    """An annotation file broken as `case` says, and the message expected for it."""
    if case == "folder":
        return tmp_path / "feats", r"--annotations .*feats: is a folder, not a file"
    if case == "binary":
        path = tmp_path / "dataset_coco.json"
        path.write_bytes(b"\xff\xfe\x00{")
        return path, r"dataset_coco.json: not a UTF-8 JSON file"
    if case == "image-not-object":
        path = _karpathy_images(tmp_path)
        path.write_text(json.dumps({"images": [json.loads(path.read_text())["images"][0], 7]}))
        return path, r"dataset_coco.json: images\[1\] is 7, expected an object"
    if case == "sentences-not-list":
        path = _karpathy_images(tmp_path, sentences="a dog")
        return path, r"'COCO_1.jpg' \(imgid 1\) has 'sentences' 'a dog', expected a list"
    if case == "sentence-not-object":
        path = _karpathy_images(tmp_path, sentences=["a dog"])
        return path, r"'COCO_1.jpg' \(imgid 1\) sentence 0 is 'a dog', expected an object"
    if case == "tokens-not-strings":
        path = _karpathy_images(tmp_path, sentences=[{"tokens": [1, 2]}])
        return path, r"sentence 0: 'tokens' is \[1, 2\], expected a list of strings"
    if case == "cocoid-not-int":
        path = _karpathy_images(tmp_path, cocoid="x1")
        return path, r"'COCO_1.jpg' \(imgid 1\): cocoid 'x1' is not an integer"
    assert case == "no-feature-name"
    annotations, _, _ = karpathy_fixture(tmp_path)
    data = json.loads(annotations.read_text())
    del data["images"][1]["cocoid"], data["images"][1]["filename"]
    annotations.write_text(json.dumps(data))
    return annotations, r"image 1 \(imgid 1\) has no 'cocoid' or 'filename' to name its feature"


ANNOTATION_CASES = [
    "folder",
    "binary",
    "image-not-object",
    "sentences-not-list",
    "sentence-not-object",
    "tokens-not-strings",
    "cocoid-not-int",
    "no-feature-name",
]


@pytest.mark.parametrize("case", ANNOTATION_CASES)
def test_broken_karpathy_annotations_are_one_line_errors(tmp_path, capsys, case):
    _, feats, _ = karpathy_fixture(tmp_path)
    annotations, match = _bad_annotations(tmp_path, case)
    argv = ["karpathy", "--annotations", str(annotations), "--features", str(feats)]
    err = cli_error([*argv, "--output", str(tmp_path / "out")], capsys)
    assert re.search(match, err), err


def test_annotation_folder_for_vcr_and_pairs_is_a_one_line_error(tmp_path, capsys):
    write_npz(tmp_path / "feats", ["1"])
    common = ["--features", str(tmp_path / "feats"), "--output", str(tmp_path / "out")]
    (tmp_path / "train.jsonl").mkdir()
    err = cli_error(["vcr", "--annotations", str(tmp_path / "train.jsonl"), *common], capsys)
    assert f"--annotations {tmp_path / 'train.jsonl'}: is a folder, not a file" in err
    err = cli_error(["pairs", "--pairs", f"train={tmp_path / 'feats'}", *common], capsys)
    assert f"--pairs {tmp_path / 'feats'}: is a folder, not a file" in err


def _bad_features(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Feature arguments broken as `case` says, and the message expected for them."""
    regions = write_npz(tmp_path / "npz", [str(100 + i) for i in range(6)])
    if case == "npz-format-on-a-file":
        path = tmp_path / "feats.tsv"
        path.write_text("")
        return [str(path), "--feature-format", "npz"], r"feature folder .*feats.tsv is not a folder"
    if case == "broken-hdf5":
        path = tmp_path / "feats.h5"
        path.write_bytes(b"not hdf5 at all")
        return [str(path)], r"feats.h5: cannot open as HDF5 \("
    if case == "hdf5-group-without-features":
        h5py = pytest.importorskip("h5py")
        path = tmp_path / "feats.h5"
        with h5py.File(path, "w") as handle:
            for key, r in regions.items():
                handle.create_group(key)["boxes"] = r["boxes"]
        return [str(path)], r"feats.h5 \(image '100'\): no 'features' dataset"
    path = tmp_path / "feats.tsv"
    lines = []
    for key, r in regions.items():
        fields = [key, "640", "480", str(len(r["features"])), b64(r["boxes"]), b64(r["features"])]
        lines.append(fields)
    if case == "tsv-bad-base64":
        lines[2][5] = "@@not base64@@"
        match = r"feats.tsv:3 \(image '102'\): features is not base64 float32"
    elif case == "tsv-bad-count":
        lines[1][3] = "three"
        match = r"feats.tsv:2 \(image '101'\): num_boxes is b'three', not a number"
    else:
        assert case == "tsv-fields-lack-features"
        path.write_text("\n".join("\t".join(fields) for fields in lines) + "\n")
        return [str(path), "--tsv-fields", "image_id", "boxes"], r"TSV fields image_id boxes \("
    path.write_text("\n".join("\t".join(fields) for fields in lines) + "\n")
    return [str(path)], match


FEATURE_CASES = [
    "npz-format-on-a-file",
    "broken-hdf5",
    "hdf5-group-without-features",
    "tsv-bad-base64",
    "tsv-bad-count",
    "tsv-fields-lack-features",
]


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_broken_feature_files_are_one_line_errors(tmp_path, capsys, case):
    annotations, _, _ = karpathy_fixture(tmp_path)
    features, match = _bad_features(tmp_path, case)
    argv = ["karpathy", "--annotations", str(annotations), "--output", str(tmp_path / "out")]
    err = cli_error([*argv, "--features", *features], capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_cli_process_exits_2_with_one_line_for_a_broken_tsv(tmp_path):
    annotations, _, _ = karpathy_fixture(tmp_path)
    features, _ = _bad_features(tmp_path, "tsv-bad-base64")
    command = [sys.executable, "-m", "xmodaler_accel.data.convert", "karpathy", "--quiet"]
    command += ["--annotations", str(annotations), "--output", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--features", *features], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "feats.tsv:3 (image '102'): features is not base64 float32" in lines[0]


# ----------------------------------------------------------------------------- VCR and pairs
def _vcr_item(**change) -> str:
    return json.dumps({**json.loads(vcr_line("img1", ["Why", "is", [0], "?"])), **change})


VCR_LINE_CASES = {  # a field of line 2 changed: (change, message expected)
    "answer_choices-not-list": (
        {"answer_choices": 5},
        r"train.jsonl:2: answer_choices is 5, expected a list of 4 choices",
    ),
    "rationale_choices-null": (
        {"rationale_choices": None},
        r"train.jsonl:2: rationale_choices is None, expected a list of 4 choices",
    ),
    "choice-is-a-string": (
        {"answer_choices": ["yes", "no", "a", "b"]},
        r"train.jsonl:2: answer_choices\[0\] is 'yes', expected a list of words and tag lists",
    ),
    "question-is-a-string": (
        {"question": "Why?"},
        r"train.jsonl:2: question is 'Why\?', expected a list of words and tag lists",
    ),
    "objects-not-list": ({"objects": 3}, r"train.jsonl:2: objects is 3, expected a list of class"),
    "objects-not-strings": (
        {"objects": [1, 2]},
        r"train.jsonl:2: objects is \[1, 2\], expected a list of class names",
    ),
    "label-not-int": (
        {"answer_label": "x"},
        r"train.jsonl:2: answer_label is 'x', expected the index of the right choice \(0 to 3\)",
    ),
    "label-out-of-range": (
        {"rationale_label": 4},
        r"train.jsonl:2: rationale_label is 4, expected the index of the right choice",
    ),
    "tag-not-int": (
        {"rationale_choices": [["a"], ["b"], [[True], "c"], ["d"]]},
        r"train.jsonl:2: tag True is not an object index \(in rationale_choices\[2\]\)",
    ),
    "img_fn-not-string": (
        {"img_fn": None},
        r"train.jsonl:2: img_fn is None, expected the image's file name",
    ),
}


def _bad_vcr(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """`--annotations` arguments broken as `case` says, and the message expected for them."""
    path = tmp_path / "train.jsonl"
    if case in VCR_LINE_CASES:
        change, match = VCR_LINE_CASES[case]
        path.write_text(_vcr_item() + "\n" + _vcr_item(**change) + "\n")
        return [str(path)], match
    if case == "not-utf8":
        latin1 = _vcr_item().replace("Why", "Caf\xe9").encode("latin-1")
        path.write_bytes(_vcr_item().encode() + b"\n" + latin1 + b"\n")
        return [str(path)], r"train.jsonl:2: not UTF-8 \(invalid continuation byte at byte \d+\)"
    if case == "utf16":
        path.write_text(_vcr_item() + "\n", encoding="utf-16")
        return [str(path)], r"train.jsonl:1: not UTF-8 \(it looks like UTF-16\); save the file as"
    if case == "empty-file":
        path.write_text("\n")
        return [str(path)], r"train.jsonl: no questions; expected one VCR JSON object per line"
    if case == "second-train-file":
        path.write_text(_vcr_item() + "\n")
        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "train.jsonl").write_text(_vcr_item() + "\n")
        match = r"more/train.jsonl: a second train file \(the first is .*/train.jsonl\)"
        return [str(path), str(tmp_path / "more" / "train.jsonl")], match
    assert case == "img_id-missing"
    path.write_text(_vcr_item() + "\n")
    return [str(path), "--image-key", "img_id"], r"train.jsonl:1: img_id is missing, expected"


VCR_CASES = [*VCR_LINE_CASES, "not-utf8", "utf16", "empty-file", "second-train-file"]


@pytest.mark.parametrize("case", [*VCR_CASES, "img_id-missing"])
def test_broken_vcr_annotations_are_one_line_errors(tmp_path, capsys, case):
    write_npz(tmp_path / "feats" / "movie", ["img1"])
    annotations, match = _bad_vcr(tmp_path, case)
    argv = ["vcr", "--features", str(tmp_path / "feats"), "--output", str(tmp_path / "out")]
    err = cli_error([*argv, "--annotations", *annotations], capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def _bad_pairs(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """`--pairs` arguments broken as `case` says, and the message expected for them."""
    jsonl, tsv = tmp_path / "train.jsonl", tmp_path / "train.tsv"
    first = json.dumps({"image_id": "5", "caption": "A red bus."}) + "\n"
    lines = {
        "jsonl-image-not-a-name": (
            {"image_id": [5], "caption": "a bus"},
            r"image_id is \[5\], exp",
        ),
        "jsonl-caption-not-string": ({"image_id": "6", "caption": ["a", "bus"]}, r"caption is \["),
        "jsonl-caption-null": ({"image": "6", "text": None}, r"text is None, expected a string"),
        "jsonl-not-an-object": (["6", "a bus"], r"expected a JSON object with 'image_id' and"),
    }
    if case in lines:
        line, match = lines[case]
        jsonl.write_text(first + json.dumps(line) + "\n")
        return [f"train={jsonl}"], r"train.jsonl:2: " + match
    if case == "tsv-empty-image-name":
        tsv.write_text("5.jpg#0\tA red bus.\n\ta bus\n")
        return [f"train={tsv}"], r"train.tsv:2: image name '' is empty"
    if case == "tsv-not-utf8":
        tsv.write_bytes(b"5.jpg#0\tA red bus.\n6.jpg\ta caf\xe9\n")
        return [f"train={tsv}"], r"train.tsv:2: not UTF-8 \(invalid continuation byte at byte 11\)"
    if case == "jsonl-utf16":
        jsonl.write_text(first, encoding="utf-16")
        return [f"train={jsonl}"], r"train.jsonl:1: not UTF-8 \(it looks like UTF-16\)"
    if case == "tsv-conceptual-captions-columns":  # Google's Train_GCC-training.tsv
        tsv.write_text("a very typical bus station\thttp://example.com/5.jpg\n")
        return [f"train={tsv}"], r"train.tsv:1: the second column is a URL: .*caption<TAB>url"
    assert case == "empty-val-file"
    tsv.write_text("5.jpg#0\tA red bus.\n")
    (tmp_path / "val.tsv").write_text("image_id\tcaption\n\n")
    match = r"val.tsv: no image-caption pairs; expected 'image<TAB>caption' lines"
    return [f"train={tsv}", f"val={tmp_path / 'val.tsv'}"], match


PAIRS_CASES = [
    "jsonl-image-not-a-name",
    "jsonl-caption-not-string",
    "jsonl-caption-null",
    "jsonl-not-an-object",
    "tsv-empty-image-name",
    "tsv-not-utf8",
    "tsv-conceptual-captions-columns",
    "jsonl-utf16",
    "empty-val-file",
]


@pytest.mark.parametrize("case", PAIRS_CASES)
def test_broken_pairs_files_are_one_line_errors(tmp_path, capsys, case):
    write_npz(tmp_path / "feats", ["5", "6"])
    pairs, match = _bad_pairs(tmp_path, case)
    argv = ["pairs", "--features", str(tmp_path / "feats"), "--output", str(tmp_path / "out")]
    err = cli_error([*argv, "--pairs", *pairs], capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    pairs = tmp_path / "train.tsv"
    pairs.write_bytes(b"\xef\xbb\xbfimage_id\tcaption\n5.jpg#0\tA bus.\n")
    assert read_pairs(pairs) == [(2, "5.jpg#0", "A bus.")]  # the header is still a header
    vcr = tmp_path / "train.jsonl"
    vcr.write_bytes(b"\xef\xbb\xbf" + _vcr_item().encode() + b"\n")
    assert read_vcr([vcr])[1]["vcr_train"][0]["annot_id"] == "a-img1"


def test_vcr_items_with_null_or_no_labels_are_unlabelled(tmp_path):
    path = tmp_path / "test.jsonl"
    unlabelled = json.loads(_vcr_item(answer_label=None))
    del unlabelled["rationale_label"]
    path.write_text(json.dumps(unlabelled) + "\n")
    row = read_vcr([path])[1]["vcr_test"][0]
    assert (row["answer_label"], row["rationale_label"]) == (-1, -1)


def test_cli_process_exits_2_with_one_line_for_a_broken_vcr_line(tmp_path):
    write_npz(tmp_path / "feats" / "movie", ["img1"])
    annotations, _ = _bad_vcr(tmp_path, "answer_choices-not-list")
    command = [sys.executable, "-m", "xmodaler_accel.data.convert", "vcr", "--quiet"]
    command += ["--features", str(tmp_path / "feats"), "--output", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--annotations", *annotations], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{annotations[0]}:2: answer_choices is 5, expected a list of 4 choices" in lines[0]


@pytest.mark.parametrize(
    ("command", "needs"),
    [
        ("karpathy", ["sentences", "cocoid", "restval"]),
        ("xmodaler", ["mscoco_caption_anno_", "vocabulary.txt", "captions_{val,test}5k.json"]),
        ("vcr", ["answer_choices", "img_fn", "vocab.txt"]),
        ("pairs", ["image<TAB>caption", '"caption"', "caption<TAB>url"]),
    ],
)
def test_each_converter_help_says_which_files_and_keys_it_needs(command, needs, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in [*needs, "example:", f"convert {command} --", "<key>.npz", "base64", "--float16"]:
        assert word in text, word
