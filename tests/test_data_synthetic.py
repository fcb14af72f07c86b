"""Synthetic scenes: deterministic, cached by parameters, grounded captions and VCR items."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Array2D

from xmodaler_accel.data import ImageDataset, build_synthetic, load_tokenizer, synthetic_dir
from xmodaler_accel.data.scene_vcr import colour_item, count_item, position_item
from xmodaler_accel.data.scenes import (
    COLOURS,
    NUMBERS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    captions_for,
    plural,
    relation,
    sample_scene,
)
from xmodaler_accel.data.synthetic import SyntheticConfig

SMALL = {"num_train": 300, "num_val": 100, "num_test": 20}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def data(cache):
    return build_synthetic(cache, **SMALL)


def tables_equal(a, b) -> bool:
    return all(a[split].data.table.equals(b[split].data.table) for split in a)


def test_same_seed_gives_identical_tables_and_tokenizers(data, cache, tmp_path):
    again = build_synthetic(tmp_path, **SMALL)
    assert list(again) == ["train", "val", "test", "vcr_train", "vcr_val", "vcr_test"]
    assert tables_equal(data, again)
    first = synthetic_dir(cache, **SMALL) / "tokenizer" / "tokenizer.json"
    assert (
        first.read_bytes()
        == (synthetic_dir(tmp_path, **SMALL) / first.parent.name / first.name).read_bytes()
    )


def test_different_seed_gives_different_scenes(data, tmp_path):
    other = build_synthetic(tmp_path, seed=1, **SMALL)
    assert other["train"]["captions"] != data["train"]["captions"]
    first, second = ImageDataset(data["val"])[0], ImageDataset(other["val"])[0]
    assert first["features"].shape != second["features"].shape or not np.array_equal(
        first["features"], second["features"]
    )


def test_cache_is_reused_and_keyed_by_every_parameter(cache):
    path = synthetic_dir(cache, **SMALL)
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert synthetic_dir(cache, **SMALL) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert synthetic_dir(cache, noise=0.7, **SMALL) != path
    assert SyntheticConfig(**SMALL).key() != SyntheticConfig(seed=1, **SMALL).key()
    rebuilt = synthetic_dir(cache, rebuild=True, **SMALL)
    assert rebuilt == path and (path / "meta.json").stat().st_mtime_ns != stamp
    with pytest.raises(TypeError, match="unknown synthetic parameters"):
        synthetic_dir(cache, num_images=3)


def test_val_does_not_depend_on_train_size_and_captions_not_on_feat_dim(data, tmp_path):
    smaller = build_synthetic(tmp_path, num_train=30, num_val=100, num_test=20)
    assert smaller["val"].data.table.equals(data["val"].data.table)
    wide = build_synthetic(tmp_path, feat_dim=2048, num_train=10, num_val=100, num_test=20)
    assert wide["val"]["captions"] == data["val"]["captions"]
    assert wide["val"].features["features"] == Array2D(shape=(None, 2048), dtype="float32")
    item = ImageDataset(wide["val"])[3]
    assert item["features"].shape == (len(item["boxes"]), 2048)


def test_float16_features(tmp_path):
    half = build_synthetic(tmp_path, dtype="float16", num_train=5, num_val=5, num_test=5)
    assert ImageDataset(half["train"])[0]["features"].dtype == np.float16


def test_image_rows_are_well_formed(data):
    table = data["train"]
    assert len(table) == 300 and len(data["val"]) == 100 and len(data["test"]) == 20
    images = ImageDataset(table)
    for row in range(len(table)):
        item = images[row]
        labels = np.asarray(item["region_labels"])
        assert item["features"].shape == (len(labels), 256)
        assert 2 <= (labels > 0).sum() <= 4 and 1 <= (labels == 0).sum() <= 3
        boxes = item["boxes"]
        assert boxes.min() >= 0 and boxes[:, :4].max() <= 1
        np.testing.assert_allclose(
            boxes[:, 4], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), rtol=1e-5
        )
        np.testing.assert_allclose(item["cls_prob"].sum(axis=1), 1.0, rtol=1e-5)
    assert table[0]["image_key"] == "train_000000" and data["val"][0]["image_id"] == 1_000_000
    assert all(len(c) == 5 for c in table["captions"])


def test_region_features_encode_the_attributes(data):
    """Nearest class mean (fit on train) names val regions' shapes: features carry the scene."""
    train, val = ImageDataset(data["train"]), ImageDataset(data["val"])

    def stack(images):
        feats = [images[i]["features"] for i in range(len(images))]
        labels = [images[i]["region_labels"] for i in range(len(images))]
        return np.concatenate(feats), np.concatenate(labels)

    x, y = stack(train)
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(SHAPES) + 1)])
    vx, vy = stack(val)
    predicted = np.argmin(((vx[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == vy).mean() > 0.95
    detector = np.argmax(np.concatenate([val[i]["cls_prob"] for i in range(len(val))]), axis=1)
    assert 0.8 < (detector == vy).mean() < 1.0  # a good but imperfect detector


def test_vocabulary_has_60_to_120_words(data, cache):
    words = {w for caps in data["train"]["captions"] for c in caps for w in c.split()}
    assert 60 <= len(words) <= 120
    tokenizer = load_tokenizer(synthetic_dir(cache, **SMALL))
    assert len(tokenizer) == len(words) + 4
    wordpiece = load_tokenizer(synthetic_dir(cache, **SMALL) / "wordpiece")
    assert "[UNK]" not in wordpiece.tokenize("what color is circle ? it is red")


def test_captions_are_grounded_in_the_scene():
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = sample_scene(rng)
        captions, raw = captions_for(scene, rng)
        assert len(set(captions)) >= 4 and raw[0].endswith(".") and raw[0][0].isupper()
        colours = {COLOURS[o.colour] for o in scene.objects}
        shapes = {SHAPES[o.shape] for o in scene.objects}
        shapes |= {plural(s) for s in shapes}
        for caption in captions:
            words = caption.split()
            assert {w for w in words if w in COLOURS} <= colours
            assert {w for w in words if w in SHAPES or w in map(plural, SHAPES)} <= shapes
            if caption.startswith("there are") and words[3] in ("shapes", "objects"):
                assert words[2] == NUMBERS[len(scene.objects)]


def test_vcr_items_have_one_right_answer_and_rationale():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = sample_scene(rng)
        for make in (colour_item, position_item, count_item):
            item = make(scene, rng)
            answers, rationales = item["answer_choices"], item["rationale_choices"]
            assert len(answers) == 4 and len({str(a) for a in answers}) == 4
            assert len(rationales) == 4 and len({str(r) for r in rationales}) == 4
            right = answers[item["answer_label"]]
            reason = rationales[item["rationale_label"]]
            if make is colour_item:
                target = scene.objects[scene.region_objects[item["question"][3][0]]]
                assert right == ["it", "is", COLOURS[target.colour]]
                assert reason[2] == COLOURS[target.colour]
                assert " ".join(reason[6:]) in POSITIONS[target.row_col]
            if make is position_item:
                a, b = (scene.objects[scene.region_objects[t[0]]] for t in (reason[0], reason[-1]))
                assert " ".join(right[2:]) in POSITIONS[a.row_col]
                assert reason[2:-1] == RELATIONS[relation(a, b)][0].split()
            if make is count_item:
                colour = item["question"][2]
                regions = [
                    r
                    for r, o in enumerate(scene.region_objects)
                    if o >= 0 and COLOURS[scene.objects[o].colour] == colour
                ]
                assert right[-1] == NUMBERS[len(regions)]
                assert next(t for t in reason if isinstance(t, list)) == regions


def test_vcr_tables_tag_regions_by_index(data):
    questions, images = data["vcr_val"], data["val"]
    assert len(questions) == len(images)
    for row in questions:
        labels = images[row["image_row"]]["region_labels"]
        names = ["background" if c == 0 else SHAPES[c - 1] for c in labels]
        assert row["objects"] == names
        for words, tags in zip(row["rationale_choices"], row["rationale_tags"]):
            assert all(t == -1 or words[i] == names[t] for i, t in enumerate(tags))
        assert 0 <= row["answer_label"] < 4 and 0 <= row["rationale_label"] < 4


def test_constant_caption_scores_low_and_a_region_reader_high(data):
    """CIDEr on val: one human-like reference vs the other four, against constant captions."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    captions = data["val"]["captions"]
    held_out, rest = (
        {i: c[:1] for i, c in enumerate(captions)},
        {i: c[1:] for i, c in enumerate(captions)},
    )
    leave_one_out, _ = cider().compute_score(rest, held_out)
    references = dict(enumerate(captions))
    constants = [
        "there are three shapes",
        "a picture of a red circle and a blue square",
        "a small red circle to the left of a large blue square",
    ]
    best_constant = max(
        cider().compute_score(references, {i: [c] for i in references})[0] for c in constants
    )
    assert leave_one_out > 0.7 and best_constant < 0.45
    assert leave_one_out > 2 * best_constant
