"""Captioners: encode-once expansion, masking, the label-smoothed loss, scheduled sampling,
the factory, and a tiny Transformer that learns synthetic scenes."""

from __future__ import annotations

import pytest
import torch

from xmodaler_accel.data import build_synthetic, load_tokenizer
from xmodaler_accel.data import synthetic_dir as synthetic_root
from xmodaler_accel.models import (
    EncoderOutput,
    TransformerCaptioner,
    UpDownCaptioner,
    build_captioner,
    label_smoothed_loss,
)
from xmodaler_accel.models.captioning import mix_in_predictions, sample_tokens
from xmodaler_accel.tasks.captioning import CaptionDataset, collate_xe

VOCAB, FEAT = 30, 16
SIZES = {
    "transformer": {
        "d_model": 32,
        "num_heads": 4,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "ffn_dim": 64,
    },
    "updown": {"hidden_size": 32, "embed_dim": 24, "visual_dim": 28, "att_size": 16},
}
NO_DROPOUT = {
    "transformer": {"dropout": 0.0, "visual_dropout": 0.0, "pred_dropout": 0.0},
    "updown": {"dropout": 0.0, "pred_dropout": 0.0},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads suffer on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_captioner(kind, vocab_size=VOCAB, feat_dim=FEAT, **SIZES[kind], **extra)


def batch(images: int = 3, regions: int = 7, per_image: int = 5, length: int = 9, seed: int = 1):
    """Random regions (image 0 has two padded regions) and BOS-led caption inputs."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(images, regions, FEAT, generator=gen)
    boxes = torch.rand(images, regions, 5, generator=gen)
    mask = torch.ones(images, regions, dtype=torch.bool)
    mask[0, -2:] = False
    ids = torch.randint(3, VOCAB, (images * per_image, length), generator=gen)
    ids[:, 0] = 1
    ids[0, 6:] = 0  # a short caption, padded
    return features, boxes, mask, ids


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_forward_with_seq_per_img_equals_forward_on_repeated_features(kind):
    model = tiny(kind).eval()
    features, boxes, mask, ids = batch()
    once = model(features, boxes, mask, ids, seq_per_img=5)
    rep = [t.repeat_interleave(5, dim=0) for t in (features, boxes, mask)]
    repeated = model(*rep, ids, seq_per_img=1)
    assert once.shape == (15, 9, VOCAB)
    torch.testing.assert_close(once, repeated, rtol=0, atol=1e-5)
    # a wrong expansion (tile instead of image-major) must not pass the same check
    tiled = model(*[t.repeat(5, *[1] * (t.dim() - 1)) for t in (features, boxes, mask)], ids)
    assert (once - tiled).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_encoder_sees_each_image_once(kind):
    model = tiny(kind).eval()
    rows: list[int] = []
    model.visual_embed.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    features, boxes, mask, ids = batch()
    model(features, boxes, mask, ids, seq_per_img=5)
    assert rows == [3]


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_padded_regions_do_not_change_the_logits(kind):
    model = tiny(kind).eval()
    features, boxes, mask, ids = batch()
    before = model(features, boxes, mask, ids, seq_per_img=5)
    features[0, -2:] = 100.0  # garbage in padded slots
    boxes[0, -2:] = 7.0
    torch.testing.assert_close(model(features, boxes, mask, ids, 5), before, rtol=0, atol=1e-5)
    mask[0, -2:] = True  # now they count
    assert (model(features, boxes, mask, ids, 5) - before).abs().max() > 1e-3


def test_forward_rejects_caption_rows_that_do_not_match_images():
    features, boxes, mask, ids = batch()
    with pytest.raises(ValueError, match="seq_per_img=4"):
        tiny("transformer")(features, boxes, mask, ids, seq_per_img=4)


def test_encoder_output_expand_is_free_and_per_row_is_image_major():
    memory = torch.arange(6.0).view(2, 3, 1)
    enc = EncoderOutput(memory=memory, mask=torch.ones(2, 3, dtype=torch.bool))
    wide = enc.expand(2).expand(3)
    assert wide.group == 6 and wide.rows == 12 and wide.memory is memory
    assert wide.per_row(torch.tensor([10, 20])).tolist() == [10] * 6 + [20] * 6
    with pytest.raises(ValueError):
        enc.expand(0)


def direct_label_smoothed(logits, targets, eps):
    """The textbook computation: an explicit smoothed distribution per valid position."""
    total, count = 0.0, 0
    vocab = logits.shape[-1]
    for row, target in zip(logits.reshape(-1, vocab), targets.reshape(-1)):
        if target == -100:
            continue
        dist = torch.full((vocab,), eps / (vocab - 1))
        dist[target] = 1 - eps
        total += -(dist * row.log_softmax(-1)).sum()
        count += 1
    return total / count


def test_label_smoothed_loss_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (4, 5), generator=gen)
    targets[1, 3:] = -100
    targets[3, 1:] = -100
    for eps in (0.0, 0.1, 0.3):
        expected = direct_label_smoothed(logits, targets, eps)
        torch.testing.assert_close(label_smoothed_loss(logits, targets, smoothing=eps), expected)
    plain = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1))
    torch.testing.assert_close(label_smoothed_loss(logits, targets, smoothing=0.0), plain)


def test_ignored_targets_contribute_nothing_to_loss_or_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 9, generator=gen, requires_grad=True)
    targets = torch.randint(0, 9, (3, 6), generator=gen)
    targets[:, 4:] = -100
    loss = label_smoothed_loss(logits, targets)
    loss.backward()
    assert logits.grad[:, 4:].abs().max() == 0 and logits.grad[:, :4].abs().max() > 0
    shifted = logits.detach().clone()
    shifted[:, 4:] += 50.0 * torch.randn(3, 2, 9, generator=gen)
    torch.testing.assert_close(label_smoothed_loss(shifted, targets), loss.detach())
    torch.testing.assert_close(label_smoothed_loss(logits[:, :4], targets[:, :4]), loss)


def test_tied_embeddings_share_one_weight_and_untied_do_not():
    tied = tiny("transformer", tie_embeddings=True)
    untied = tiny("transformer")
    assert tied.predictor.weight is tied.token_embed.embed.weight
    assert untied.predictor.weight is not untied.token_embed.embed.weight
    count = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert count == VOCAB * 32


def test_build_captioner_builds_both_kinds_and_rejects_others():
    assert isinstance(tiny("transformer"), TransformerCaptioner)
    assert isinstance(tiny("updown"), UpDownCaptioner)
    model = tiny("transformer")
    assert (model.vocab_size, model.bos_id, model.eos_id, model.pad_id) == (VOCAB, 1, 2, 0)
    assert model.max_len == 20 and model.ss_prob == 0.0
    with pytest.raises(ValueError, match="updown"):
        build_captioner("lstm", vocab_size=VOCAB, feat_dim=FEAT)


def test_mix_in_predictions_replaces_later_inputs_by_previous_predictions():
    ids = torch.tensor([[1, 5, 6, 7, 0], [1, 8, 9, 0, 0]])
    predicted = torch.tensor([[15, 16, 17, 18, 19], [25, 26, 27, 28, 29]])
    assert torch.equal(mix_in_predictions(ids, predicted, 0.0, pad_id=0), ids)
    mixed = mix_in_predictions(ids, predicted, 1.0, pad_id=0)
    assert mixed.tolist() == [[1, 15, 16, 17, 0], [1, 25, 26, 0, 0]]


def test_transformer_scheduled_sampling_is_a_second_pass_on_mixed_inputs():
    model = tiny("transformer", **NO_DROPOUT["transformer"]).train()
    features, boxes, mask, ids = batch()
    teacher = model(features, boxes, mask, ids, 5)
    model.ss_prob = 0.5
    torch.manual_seed(3)
    scheduled = model(features, boxes, mask, ids, 5)
    torch.manual_seed(3)
    enc = model.encode(features, boxes, mask).expand(5)
    predicted = sample_tokens(model.decode(enc, ids))
    expected = model.decode(enc, mix_in_predictions(ids, predicted, 0.5, 0))
    torch.testing.assert_close(scheduled, expected)
    assert (scheduled - teacher).abs().max() > 1e-3
    scheduled.sum().backward()  # the second pass carries grad
    assert model.visual_embed.features.weight.grad.abs().sum() > 0
    model.eval()  # evaluation ignores ss_prob
    torch.testing.assert_close(model(features, boxes, mask, ids, 5), teacher)


def test_updown_scheduled_sampling_feeds_back_its_own_samples():
    model = tiny("updown", **NO_DROPOUT["updown"]).train()
    features, boxes, mask, ids = batch()
    teacher = model(features, boxes, mask, ids, 5)
    model.ss_prob = 1.0
    scheduled = model(features, boxes, mask, ids, 5)
    torch.testing.assert_close(scheduled[:, 0], teacher[:, 0])  # first step reads BOS either way
    assert (scheduled[:, 1:] - teacher[:, 1:]).abs().max() > 1e-3
    model.ss_prob = 0.0
    torch.testing.assert_close(model(features, boxes, mask, ids, 5), teacher)


@pytest.fixture(scope="module")
def synthetic_batch(tmp_path_factory):
    params = {"num_train": 8, "num_val": 2, "num_test": 2, "feat_dim": 32, "seed": 3}
    cache = tmp_path_factory.mktemp("synthetic")
    tokenizer = load_tokenizer(synthetic_root(cache, **params))
    data = CaptionDataset(build_synthetic(cache, **params)["train"], tokenizer, seq_per_img=5)
    return collate_xe([data[i] for i in range(len(data))]), len(tokenizer)


def test_tiny_transformer_overfits_a_few_synthetic_images(synthetic_batch):
    xe, vocab = synthetic_batch
    torch.manual_seed(0)
    model = TransformerCaptioner(
        vocab, 32, d_model=64, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
        ffn_dim=128, dropout=0.0, visual_dropout=0.0, pred_dropout=0.0,
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs = (xe["features"], xe["boxes"], xe["region_mask"], xe["input_ids"], xe["seq_per_img"])
    losses = []
    for _ in range(60):
        loss = label_smoothed_loss(model(*inputs), xe["target_ids"], smoothing=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # about log(vocab) at the start
    assert losses[-1] < 0.2 * losses[0]
