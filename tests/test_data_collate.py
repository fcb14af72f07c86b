"""Batching: padded regions and masks, XE/SCST/pair/VCR batches, map-style dataset views."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from xmodaler_accel.data import (
    ArrowColumns,
    ImageDataset,
    PairDataset,
    build_synthetic,
    collate_images,
    collate_pairs,
    load_tokenizer,
    mask_regions,
    mask_tokens,
    pad_regions,
    synthetic_dir,
)
from xmodaler_accel.tasks.captioning import CaptionDataset, collate_xe
from xmodaler_accel.tasks.vcr import VCRTaskDataset, collate_choices

PARAMS = {"num_train": 40, "num_val": 12, "num_test": 4, "seed": 5}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_dir(tmp_path_factory.mktemp("synthetic"), **PARAMS)


@pytest.fixture(scope="module")
def data(root):
    return build_synthetic(root.parent, **PARAMS)


def test_pad_regions_truncates_pads_and_prepends_the_global_mean():
    a = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    b = np.arange(6 * 2, dtype=np.float32).reshape(6, 2) + 100
    boxes = [np.full((3, 5), 0.5, np.float32), np.full((6, 5), 0.25, np.float32)]
    feats, locs, mask = pad_regions([a, b], boxes, max_feat_num=4, use_global_v=True)
    assert feats.shape == (2, 5, 2) and locs.shape == (2, 5, 5) and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert feats[0, 0].tolist() == a.mean(0).tolist()
    assert feats[1, 0].tolist() == b[:4].mean(0).tolist()  # over the kept regions, as X-modaler
    assert feats[0, 1:4].tolist() == a.tolist() and feats[0, 4].tolist() == [0, 0]
    assert feats[1, 1:].tolist() == b[:4].tolist()
    assert locs[0, 0].tolist() == [0, 0, 1, 1, 1] and locs[0, 4].tolist() == [0] * 5
    feats, _, mask = pad_regions([a.astype(np.float16), b], boxes, max_feat_num=0)
    assert feats.dtype == torch.float32 and feats.shape == (2, 6, 2) and mask.sum() == 9


def item(index: int, n_regions: int, captions: list[list[int]]) -> dict:
    return {
        "index": index,
        "image_index": index,
        "image_id": 10 + index,
        "features": np.ones((n_regions, 4), np.float32),
        "boxes": np.zeros((n_regions, 5), np.float32),
        "input_ids": [np.array(c) for c in captions],
        "references": [f"caption {index}"],
    }


def test_collate_xe_shifts_targets_and_keeps_one_feature_row_per_image():
    batch = collate_xe([item(0, 2, [[1, 7, 2], [1, 8, 9, 2]]), item(1, 3, [[1, 5, 2], [1, 2]])])
    assert batch["features"].shape == (2, 3, 4) and batch["seq_per_img"] == 2
    assert batch["input_ids"].tolist() == [[1, 7, 0], [1, 8, 9], [1, 5, 0], [1, 0, 0]]
    assert batch["target_ids"].tolist() == [[7, 2, -100], [8, 9, 2], [5, 2, -100], [2, -100, -100]]
    assert batch["token_mask"].sum(1).tolist() == [2, 3, 2, 1]
    assert batch["image_ids"].tolist() == [10, 11] and batch["region_mask"].sum().item() == 5
    with pytest.raises(ValueError, match=r"images have \[1, 2\] captions each"):
        collate_xe([item(0, 2, [[1, 2]]), item(1, 2, [[1, 2], [1, 2]])])


def test_image_batches_name_the_rows_their_rewards_look_up(data):
    dataset = ImageDataset(data["val"])
    batch = collate_images([dataset[i] for i in (4, 1, 2)])
    assert batch["index"].tolist() == [4, 1, 2]
    assert batch["image_ids"].tolist() == [data["val"][i]["image_id"] for i in (4, 1, 2)]
    assert batch["features"].shape[0] == 3 and "input_ids" not in batch


def test_caption_dataset_samples_seq_per_img_reproducibly(data, root):
    tokenizer = load_tokenizer(root)
    dataset = CaptionDataset(data["train"], tokenizer, seq_per_img=3, seed=1)
    first = [ids.tolist() for ids in dataset[4]["input_ids"]]
    assert first == [ids.tolist() for ids in dataset[4]["input_ids"]]
    all_ids = [ids.tolist() for ids in CaptionDataset(data["train"], tokenizer)[4]["input_ids"]]
    assert len(first) == 3 and all(ids in all_ids for ids in first)
    dataset.set_epoch(1)
    assert [ids.tolist() for ids in dataset[4]["input_ids"]] != first
    more = CaptionDataset(data["train"], tokenizer, seq_per_img=7)[4]["input_ids"]
    assert len(more) == 7 and [ids.tolist() for ids in more[:5]] == all_ids
    short = CaptionDataset(data["train"], tokenizer, max_seq_len=3)[4]["input_ids"]
    assert max(len(ids) for ids in short) == 5 and all(ids[-1] == 2 for ids in short)


def test_caption_batches_decode_to_the_stored_captions(data, root):
    tokenizer = load_tokenizer(root)
    dataset = CaptionDataset(data["val"], tokenizer, seq_per_img=5)
    batch = collate_xe([dataset[i] for i in range(4)], use_global_v=True)
    assert batch["input_ids"].shape[0] == 20
    decoded = tokenizer.batch_decode(batch["target_ids"].clamp(min=0), skip_special_tokens=True)
    assert decoded == [c for caps in data["val"]["captions"][:4] for c in caps]
    assert (batch["region_labels"][:, 0] == -1).all() and (batch["boxes"][:, 0, 4] == 1).all()


def test_pair_dataset_walks_every_caption(data, root):
    wordpiece = load_tokenizer(root / "wordpiece")
    pairs = PairDataset(data["val"], wordpiece)
    assert len(pairs) == 5 * len(data["val"])
    assert pairs.locate(7) == (1, 2) and pairs[7]["caption"] == data["val"][1]["captions"][2]
    batch = collate_pairs([pairs[i] for i in range(6, 12)])
    assert batch["image_index"].tolist() == [1, 1, 1, 1, 2, 2]
    assert batch["input_ids"][:, 0].eq(wordpiece.cls_token_id).all()
    assert batch["features"].shape[0] == 6 and batch["cls_prob"].shape[-1] == 9
    text_only = collate_pairs([PairDataset(data["val"], wordpiece, with_regions=False)[7]])
    assert "features" not in text_only and text_only["input_ids"].equal(
        batch["input_ids"][1:2, : len(text_only["input_ids"][0])]
    )


def test_vcr_batches_carry_tags_to_sub_words(data, root):
    wordpiece = load_tokenizer(root / "wordpiece")
    qa = VCRTaskDataset.from_dict(data, "val", wordpiece, "qa")
    row = data["vcr_val"][0]
    example = qa[0]
    tokens = wordpiece.convert_ids_to_tokens(example["input_ids"][0])
    tagged = [(t, tag) for t, tag in zip(tokens, example["tags"][0]) if tag >= 0]
    question_tagged = [(w, t) for w, t in zip(row["question"], row["question_tags"]) if t >= 0]
    assert tagged[: len(question_tagged)] == question_tagged
    items = [qa[i] for i in range(3)]
    batch = collate_choices(items, use_global_v=True)
    assert batch["input_ids"].shape[:2] == (3, 4) and batch["tags"].shape[:2] == (3, 4)
    plain = collate_choices(items)
    assert torch.equal(batch["tags"], torch.where(plain["tags"] >= 0, plain["tags"] + 1, -1))
    assert collate_choices(items, max_feat_num=1)["tags"].max() <= 0
    assert batch["labels"].tolist() == data["vcr_val"]["answer_label"][:3]
    qar = VCRTaskDataset.from_dict(data, "val", wordpiece, "qar")
    qar_batch = collate_choices([qar[i] for i in range(3)])
    assert qar_batch["labels"].tolist() == data["vcr_val"]["rationale_label"][:3]


def test_arrow_columns_match_datasets_decoding_without_copies(data):
    table = data["train"]
    columns = ArrowColumns(table)
    for row in (0, 17, 39):
        expected = np.array(table[row]["features"], dtype=np.float32)
        got = columns.array("features", row)
        np.testing.assert_array_equal(got, expected)
        assert not got.flags.writeable and not got.flags.owndata  # a view of the mapped file
    shuffled = table.shuffle(seed=0).select(range(10))
    view = ArrowColumns(shuffled)
    for row in range(10):
        np.testing.assert_array_equal(view.array("boxes", row), np.array(shuffled[row]["boxes"]))
        assert view.value("image_id", row) == shuffled[row]["image_id"]
    payload = pickle.dumps(ImageDataset(table))
    assert len(payload) < 100_000  # workers get the file path, not the arrays
    np.testing.assert_array_equal(
        pickle.loads(payload)[39]["features"], columns.array("features", 39)
    )


def test_dataloader_workers_give_the_same_batches(data, root):
    dataset = CaptionDataset(data["train"], load_tokenizer(root), seq_per_img=5)
    collate = functools.partial(collate_xe, max_feat_num=50)
    serial = list(DataLoader(dataset, batch_size=8, collate_fn=collate))
    parallel = list(DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=2))
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel):
        assert a["features"].equal(b["features"]) and a["input_ids"].equal(b["input_ids"])


def test_mask_tokens_and_regions_skip_specials_and_padding():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 32), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    masked, labels = mask_tokens(ids, special, mask_id=4, vocab_size=100, generator=generator)
    picked = labels != -100
    assert not picked[:, 0].any() and 0.12 < picked.float().mean() < 0.18
    assert labels[picked].equal(ids[picked]) and masked[~picked].equal(ids[~picked])
    assert 0.75 < (masked[picked] == 4).float().mean() < 0.85
    feats = torch.ones(64, 10, 3)
    region_mask = torch.arange(10).expand(64, 10) < 6
    out, chosen = mask_regions(feats, region_mask, prob=0.5, generator=generator)
    assert not chosen[~region_mask].any() and chosen.any()
    assert (out.sum(-1) == 0).sum() <= chosen.sum() and out[~chosen].eq(1).all()


def test_padding_to_a_multiple_changes_neither_the_loss_nor_its_gradient_and_bounds_graphs():
    """data.pad_multiple: widths round up (a few shapes for torch.compile); the extra PAD
    columns are masked out of the loss and causal attention never reads them."""
    from torch._dynamo.utils import counters

    from xmodaler_accel.models import build_captioner, label_smoothed_loss

    torch.manual_seed(0)
    model = build_captioner(
        "transformer", vocab_size=12, feat_dim=4, d_model=16, num_heads=2, ffn_dim=32,
        num_encoder_layers=1, num_decoder_layers=1, dropout=0.0, visual_dropout=0.0,
        pred_dropout=0.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)

    def batch(width, multiple):
        captions = [[1, *rng.integers(3, 12, size=width - 1).tolist(), 2], [1, 4, 2]]
        return collate_xe([item(0, 3, captions)], pad_multiple=multiple)

    def loss_and_grad(b, forward):
        model.zero_grad()
        ids = b["input_ids"]
        logits = forward(b["features"], b["boxes"], b["region_mask"], ids, seq_per_img=2)
        loss = label_smoothed_loss(logits, b["target_ids"])
        loss.backward()
        return loss.detach(), model.predictor.weight.grad.clone()

    captions = [[1, 5, 6, 7, 8, 9, 2], [1, 4, 2]]
    plain = collate_xe([item(0, 3, captions)])
    padded = collate_xe([item(0, 3, captions)], pad_multiple=8)
    assert plain["input_ids"].shape[1] == 6 and padded["input_ids"].shape[1] == 8
    loss, grad = loss_and_grad(plain, model)
    padded_loss, padded_grad = loss_and_grad(padded, model)
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded_grad, grad, rtol=0, atol=1e-6)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    for width in range(1, 17):  # input widths 1..16: two buckets of 8
        loss_and_grad(batch(width, 8), compiled)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
