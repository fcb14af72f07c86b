"""Retrieval losses, negative selection, clip_inputs and the single-stream encoder."""

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from xmodaler_accel.config import Config
from xmodaler_accel.models.retrieval import build_single_stream, build_two_stream
from xmodaler_accel.models.single_stream import build_bert
from xmodaler_accel.tasks.retrieval.steps import (
    clip_inputs,
    gather_with_grad,
    infonce_loss,
    itm_step,
    max_violation_loss,
    mine_negatives,
    retrieval_step,
    select_negatives,
)

SINGLE = Config(
    {"bert_dir": "", "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "dropout": 0.0}
)
SINGLE["pooling"] = "cls"
TWO = Config(
    {
        "hidden": 32,
        "embed_dim": 16,
        "image_layers": 1,
        "text_encoder": "gru",
        "text_layers": 1,
        "heads": 2,
        "dropout": 0.0,
        "loss": "infonce",
        "margin": 0.2,
        "temperature": 0.07,
    }
)


def pair_batch(num_pairs=6, images=(0, 0, 1, 2, 3, 3), seed=0, extra_tokens=0, extra_regions=0):
    """A collate_pairs-like batch with varying lengths, plus optional extra padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (num_pairs,), generator=gen)
    counts = torch.randint(2, 6, (num_pairs,), generator=gen)
    length, count = int(lengths.max()) + extra_tokens, int(counts.max()) + extra_regions
    text_mask = torch.arange(length)[None, :] < lengths[:, None]
    region_mask = torch.arange(count)[None, :] < counts[:, None]
    ids = torch.randint(5, 40, (num_pairs, length), generator=gen) * text_mask
    return {
        "input_ids": ids,
        "attention_mask": text_mask,
        "features": torch.randn(num_pairs, count, 12, generator=gen) * region_mask[..., None],
        "boxes": torch.rand(num_pairs, count, 5, generator=gen) * region_mask[..., None],
        "region_mask": region_mask,
        "image_index": torch.tensor(images),
    }


def loop_max_violation(sims, images, margin):
    total = 0.0
    n = len(sims)
    for i in range(n):
        worst_caption = max(
            [max(0.0, margin + sims[i][j] - sims[i][i]) for j in range(n) if images[j] != images[i]]
            or [0.0]
        )
        worst_image = max(
            [max(0.0, margin + sims[j][i] - sims[i][i]) for j in range(n) if images[j] != images[i]]
            or [0.0]
        )
        total += worst_caption + worst_image
    return total / n


def test_max_violation_matches_a_direct_loop():
    gen = torch.Generator().manual_seed(0)
    images = [0, 0, 1, 2, 2, 3, 4, 5]
    sims = torch.randn(8, 8, generator=gen)
    positive = torch.tensor(images)[:, None] == torch.tensor(images)[None, :]
    loss = max_violation_loss(sims, positive, margin=0.3)
    assert loss.item() == pytest.approx(loop_max_violation(sims.tolist(), images, 0.3), rel=1e-6)


def test_max_violation_ignores_other_captions_of_the_same_image():
    sims = torch.tensor([[1.0, 5.0], [5.0, 1.0]])  # the "negatives" are the same image
    positive = torch.ones(2, 2, dtype=torch.bool)
    assert max_violation_loss(sims, positive).item() == 0.0


def test_infonce_masks_same_image_pairs_and_is_symmetric():
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2], [0.0, 0.1, 0.5]])
    positive = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    loss = infonce_loss(sims, positive, 10.0)
    logits = sims * 10
    expected = 0.0
    for i, keep in enumerate(([0, 2], [1, 2], [0, 1, 2])):  # row/column i minus its positives
        expected -= torch.log_softmax(logits[i, keep], 0)[keep.index(i)] / 6
        expected -= torch.log_softmax(logits[keep, i], 0)[keep.index(i)] / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_select_negatives_picks_the_highest_scoring_non_positives():
    scores = torch.tensor([[9.0, 1.0, 7.0, 3.0], [0.0, 8.0, 2.0, 5.0]])
    positive = torch.tensor([[True, False, False, False], [False, True, False, False]])
    index, valid = select_negatives(scores, positive, count=2)
    assert index.tolist() == [[2, 3], [3, 2]]
    assert valid.all()


def test_select_negatives_marks_missing_candidates_invalid():
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    positive = torch.tensor([[True, False, True]])
    index, valid = select_negatives(scores, positive, count=4)
    assert index[0, 0].item() == 1 and valid.tolist() == [[True, False, False, False]]


class TableScorer(torch.nn.Module):
    """Scores pair (image row i, caption row j) as table[i, j], read back from the inputs."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask, features, boxes, region_mask):
        return self.table[features[:, 0, 0].long(), input_ids[:, 0]]


def test_hard_negative_mining_picks_the_highest_scoring_non_positive():
    images = torch.tensor([0, 0, 1, 2, 3])
    table = torch.tensor(
        [
            [5.0, 9.0, 1.0, 4.0, 2.0],  # row 1 is the same image (positive): skip it -> col 3
            [9.0, 5.0, 3.0, 1.0, 2.0],
            [0.0, 2.0, 5.0, 1.0, 0.5],
            [1.0, 0.0, 7.0, 5.0, 2.5],
            [3.0, 3.5, 0.0, 0.0, 5.0],
        ]
    )
    batch = {
        "features": torch.arange(5.0)[:, None, None].expand(5, 2, 3).clone(),
        "boxes": torch.zeros(5, 2, 5),
        "region_mask": torch.ones(5, 2, dtype=torch.bool),
        "input_ids": torch.arange(5)[:, None].expand(5, 4).clone(),
        "attention_mask": torch.ones(5, 4, dtype=torch.bool),
        "image_index": images,
    }
    model = TableScorer(table).train()
    groups = mine_negatives(model, batch, torch.arange(5), count=1, side="both", hard=True, chunk=7)
    (text_img, text_cap, text_ok), (img_img, img_cap, img_ok) = groups
    # Captions for each image row: the best column that is not the same image.
    assert text_img[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert text_cap[:, 0].tolist() == [3, 2, 1, 2, 1]
    # Images for each caption row: the best row that is not the same image.
    assert img_cap[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert img_img[:, 0].tolist() == [4, 4, 3, 0, 3]
    assert text_ok.all() and img_ok.all()
    assert model.training  # mining switches to eval mode and back


def test_clip_inputs_trims_padding_and_leaves_scores_unchanged():
    torch.manual_seed(0)
    model = build_single_stream(SINGLE, feat_dim=12, vocab_size=40, pad_id=0).eval()
    padded = pair_batch(extra_tokens=5, extra_regions=3)
    clipped = clip_inputs(padded)
    assert clipped["input_ids"].shape[1] == padded["attention_mask"].sum(1).max()
    assert clipped["features"].shape[1] == padded["region_mask"].sum(1).max()
    keys = ("input_ids", "attention_mask", "features", "boxes", "region_mask")
    with torch.no_grad():
        full = model(**{k: padded[k] for k in keys})
        short = model(**{k: clipped[k] for k in keys})
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_mean_pooling_is_padding_invariant_too():
    torch.manual_seed(0)
    model = build_single_stream(
        Config({**SINGLE, "pooling": "mean"}), feat_dim=12, vocab_size=40, pad_id=0
    ).eval()
    padded = pair_batch(extra_tokens=4, extra_regions=2)
    keys = ("input_ids", "attention_mask", "features", "boxes", "region_mask")
    with torch.no_grad():
        full = model(**{k: padded[k] for k in keys})
        short = model(**{k: v for k, v in clip_inputs(padded).items() if k in keys})
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def fake_engine(model):
    accelerator = SimpleNamespace(num_processes=1, process_index=0)
    return SimpleNamespace(
        model=model,
        unwrapped_model=model,
        gathered_model=lambda: nullcontext(model),
        accelerator=accelerator,
    )


@pytest.mark.parametrize("hard", [False, True])
def test_itm_step_trains_on_one_positive_and_its_negatives(hard):
    torch.manual_seed(0)
    model = build_single_stream(SINGLE, feat_dim=12, vocab_size=40, pad_id=0).train()
    out = itm_step(fake_engine(model), pair_batch(), negatives=2, hard=hard)
    # Softmax over 1 positive + 2 text + 2 image negatives: about log(5) at initialisation.
    assert out["loss"].item() == pytest.approx(math.log(5), abs=0.2)
    out["loss"].backward()
    assert model.encoder.regions.feature.weight.grad.abs().sum() > 0


def test_two_stream_step_gives_gradients_to_both_encoders_and_temperature():
    torch.manual_seed(0)
    model = build_two_stream(TWO, feat_dim=12, vocab_size=40, pad_id=0)
    out = retrieval_step(fake_engine(model), pair_batch(), loss="infonce")
    out["loss"].backward()
    assert model.logit_scale.grad is not None
    assert model.images.feature.weight.grad.abs().sum() > 0
    assert model.texts.embed.weight.grad.abs().sum() > 0


def test_gather_with_grad_is_the_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(SimpleNamespace(num_processes=1), x) is x


def test_single_stream_bert_loads_from_a_local_directory(tmp_path):
    torch.manual_seed(0)
    saved = build_bert(
        vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    saved.save_pretrained(tmp_path)
    loaded = build_bert(vocab_size=50, bert_dir=tmp_path)
    assert loaded.config.hidden_size == 32
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="word embeddings"):
        build_bert(vocab_size=51, bert_dir=tmp_path)


def test_missing_bert_directory_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.single_stream.bert_dir"):
        build_bert(vocab_size=50, bert_dir=tmp_path / "nope")


def test_a_bert_saved_in_float16_loads_in_float32(tmp_path):
    saved = build_bert(
        vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    ).half()
    saved.save_pretrained(tmp_path)
    loaded = build_bert(vocab_size=50, bert_dir=tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_single_stream_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_single_stream(SINGLE, feat_dim=12, vocab_size=40, pad_id=0).eval()
    batch = pair_batch()
    inputs = {k: v for k, v in batch.items() if k != "image_index"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(**inputs)
    # bf16 scores would tie between close candidates, and R@K counts ties as misses.
    assert scores.dtype == torch.float32
