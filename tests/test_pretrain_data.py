"""Pretraining pairs: masking statistics, determinism, ITM negatives, collation."""

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.objectives import IGNORE_INDEX
from xmodaler_accel.tasks.pretraining import PretrainPairs, caption_specials, collate_pretrain

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 8, "num_test": 0}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = synthetic_dir(tmp_path_factory.getbasetemp() / "pretrain_cache", **SYNTHETIC)
    data = load_from_disk(str(root))
    return data, load_tokenizer(root / "wordpiece"), load_tokenizer(root / "tokenizer")


@pytest.fixture(scope="module")
def pairs(parts):
    data, wordpiece, words = parts
    return PretrainPairs(data["train"], wordpiece, words, seed=3)


def all_items(pairs, epochs):
    for epoch in range(epochs):
        pairs.set_epoch(epoch)
        yield from (pairs[i] for i in range(len(pairs)))
    pairs.set_epoch(0)


def test_text_masking_picks_15_percent_and_splits_80_10_10(pairs):
    tok = pairs.tokenizer
    specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    candidates = picked = as_mask = kept = 0
    for item in all_items(pairs, epochs=8):
        clean = np.asarray(tok(item["caption"], truncation=True, max_length=40)["input_ids"])
        labels, masked = item["mlm_labels"], item["input_ids"]
        chosen = labels != IGNORE_INDEX
        assert not any(int(t) in specials for t in clean[chosen])  # [CLS]/[SEP] never masked
        assert np.array_equal(labels[chosen], clean[chosen])  # labels are the original words
        assert np.array_equal(masked[~chosen], clean[~chosen])  # the rest is untouched
        candidates += int(sum(int(t) not in specials for t in clean))
        picked += int(chosen.sum())
        as_mask += int((masked[chosen] == tok.mask_token_id).sum())
        kept += int((masked[chosen] == clean[chosen]).sum())
    assert picked / candidates == pytest.approx(0.15, abs=0.015)
    assert as_mask / picked == pytest.approx(0.8, abs=0.03)
    # 10% kept on purpose, plus the random replacements that drew the same word by chance.
    assert kept / picked == pytest.approx(0.1, abs=0.03)
    assert (picked - as_mask - kept) / picked == pytest.approx(0.1, abs=0.03)


def test_region_masking_picks_15_percent_and_zeroes_90_percent_of_them(pairs):
    regions = picked = zeroed = 0
    for item in all_items(pairs, epochs=8):
        chosen = item["region_picked"]
        zero = ~item["features"].any(axis=1)
        assert not (zero & ~chosen).any()  # only picked regions are zeroed
        assert np.array_equal(item["features"][~zero], item["target_features"][~zero])
        regions, picked, zeroed = regions + len(chosen), picked + chosen.sum(), zeroed + zero.sum()
    assert picked / regions == pytest.approx(0.15, abs=0.02)
    assert zeroed / picked == pytest.approx(0.9, abs=0.04)


def test_caption_input_masks_words_but_never_bos_and_targets_stay_clean(pairs):
    bos, eos, _, mask_id = caption_specials(pairs.caption_tokenizer)
    words = masked = 0
    for item in all_items(pairs, epochs=4):
        clean = pairs.caption_tokenizer(item["caption"], truncation=True, max_length=22)
        clean = clean["input_ids"]
        assert item["caption_target"].tolist() == clean[1:] and clean[-1] == eos
        flags, inputs = item["caption_masked"], item["caption_input"]
        assert inputs[0] == bos and not flags[0]
        assert np.array_equal(inputs[~flags], np.asarray(clean[:-1])[~flags])
        words, masked = words + len(flags) - 1, masked + flags.sum()
    assert masked / words == pytest.approx(0.15, abs=0.02)
    assert mask_id == pairs.caption_tokenizer.unk_token_id  # the word vocabulary has no [MASK]


def test_masks_are_a_function_of_seed_epoch_and_pair(parts, pairs):
    data, wordpiece, words = parts
    twin = PretrainPairs(data["train"], wordpiece, words, seed=3)
    a, b = pairs[7], twin[7]
    for key in ("input_ids", "mlm_labels", "features", "negative_ids", "caption_input"):
        assert np.array_equal(a[key], b[key]), key
    twin.set_epoch(1)
    changed = [not np.array_equal(pairs[i]["mlm_labels"], twin[i]["mlm_labels"]) for i in range(40)]
    assert any(changed)


def test_itm_negative_is_a_caption_of_another_image(pairs):
    tok = pairs.tokenizer
    for index in range(0, len(pairs), 7):
        row, _ = pairs.locate(index)
        gen = pairs.generator(index)
        negative = pairs.negative_pair(row, gen)  # the item's first draw
        assert pairs.locate(negative)[0] != row
        for _ in range(20):  # drawn from every other image, never the own one
            assert pairs.locate(pairs.negative_pair(row, gen))[0] != row
        other_row, k = pairs.locate(negative)
        caption = pairs.columns.value("captions", other_row)[k]
        clean = tok(caption, truncation=True, max_length=40)["input_ids"]
        assert pairs[index]["negative_ids"].tolist() == clean  # unmasked: ITM sees clean pairs


def test_collate_pads_captions_and_negatives_together_and_truncates_regions(pairs):
    items = [pairs[i] for i in (0, 5, 11, 23)]
    batch = collate_pretrain(items, max_feat_num=3, pad_id=0, caption_pad_id=0)
    b, t = batch["input_ids"].shape
    assert batch["negative_ids"].shape == (b, t) == batch["mlm_labels"].shape
    assert batch["features"].shape[1] == 3 == batch["target_features"].shape[1]
    assert batch["region_picked"].shape == batch["region_mask"].shape
    assert not (batch["region_picked"] & ~batch["region_mask"]).any()
    for k, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][k, :n].tolist() == item["input_ids"].tolist()
        assert batch["attention_mask"][k].sum() == n
        assert (batch["mlm_labels"][k, n:] == IGNORE_INDEX).all()
        clean = pairs.tokenizer(item["caption"], truncation=True, max_length=40)["input_ids"]
        assert batch["clean_ids"][k, :n].tolist() == clean
        regions = min(3, len(item["features"]))
        assert torch.equal(
            batch["target_features"][k, :regions], torch.from_numpy(item["target_features"][:3])
        )
        steps = len(item["caption_input"])
        assert batch["caption_masked"][k, :steps].tolist() == item["caption_masked"].tolist()
        assert (batch["caption_target"][k, steps:] == IGNORE_INDEX).all()
