"""Self-critical steps: baselines, the policy-gradient loss, rewards from training references."""

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xmodaler_accel.decoding import beam_search, greedy, sample
from xmodaler_accel.models import build_captioner
from xmodaler_accel.tasks.captioning.steps import _group_baseline, scst_step


class LengthScorer:
    """A stand-in reward: the number of real tokens (so rewards differ between samples)."""

    def score(self, image_index, candidates):
        return (np.asarray(candidates) > 2).sum(axis=1).astype(np.float64) + np.asarray(image_index)


class ShortnessScorer:
    """Rewards short captions: the policy must learn to emit EOS early."""

    def score(self, image_index, candidates):
        return -(np.asarray(candidates) > 2).sum(axis=1).astype(np.float64)


def tiny_model():
    torch.manual_seed(0)
    model = build_captioner(
        "transformer",
        vocab_size=12,
        feat_dim=6,
        d_model=16,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=32,
        dropout=0.0,
        visual_dropout=0.0,
        pred_dropout=0.0,
        max_len=6,
    )
    return model.eval()  # no dropout: the same random stream draws the same samples


def batch(images=3):
    gen = torch.Generator().manual_seed(1)
    return {
        "features": torch.randn(images, 4, 6, generator=gen),
        "boxes": torch.rand(images, 4, 5, generator=gen),
        "region_mask": torch.ones(images, 4, dtype=torch.bool),
        "index": torch.arange(images),
    }


def fake_engine(model):
    return SimpleNamespace(
        model=model, unwrapped_model=model, gathered_model=lambda: nullcontext(model), scalars={}
    )


def sequence_log_probs(model, b, tokens, n):
    enc = model.encode(b["features"], b["boxes"], b["region_mask"]).expand(n)
    inputs = torch.cat([torch.full_like(tokens[:, :1], model.bos_id), tokens[:, :-1]], 1)
    lp = model.decode(enc, inputs).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return lp.masked_fill(tokens == model.pad_id, 0).sum(1)


def test_group_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert torch.equal(
        _group_baseline(rewards, leave_one_out=False), torch.tensor([[2.0] * 3, [2.0] * 3])
    )
    assert torch.equal(
        _group_baseline(rewards, leave_one_out=True),
        torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]),
    )


def test_beam_sampler_with_mean_baseline_matches_direct_computation():
    model, b, scorer = tiny_model(), batch(), LengthScorer()
    out = scst_step(
        fake_engine(model),
        b,
        scorer=scorer,
        sampler="beam",
        baseline="mean",
        samples_per_image=3,
        max_len=6,
    )
    with torch.no_grad():
        enc = model.encode(b["features"], b["boxes"], b["region_mask"])
        beams = beam_search(model, enc, beam_size=3, max_len=6).beams.reshape(9, -1)
    rewards = torch.as_tensor(
        scorer.score(np.repeat([0, 1, 2], 3), beams.numpy()), dtype=torch.float32
    )
    base = rewards.view(3, 3).mean(1).repeat_interleave(3)
    expected = -((rewards - base) * sequence_log_probs(model, b, beams, 3)).mean()
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["reward"], rewards.mean())
    torch.testing.assert_close(out["baseline"], base.mean())


def test_sample_with_greedy_baseline_matches_direct_computation():
    model, b, scorer = tiny_model(), batch(), LengthScorer()
    torch.manual_seed(5)
    out = scst_step(
        fake_engine(model),
        b,
        scorer=scorer,
        sampler="sample",
        baseline="greedy",
        samples_per_image=4,
        max_len=6,
    )
    torch.manual_seed(5)
    with torch.no_grad():
        enc = model.encode(b["features"], b["boxes"], b["region_mask"])
        samples = sample(model, enc, n=4, max_len=6).tokens
        best = greedy(model, enc, max_len=6).tokens
    rewards = torch.as_tensor(
        scorer.score(np.repeat([0, 1, 2], 4), samples.numpy()), dtype=torch.float32
    )
    base = torch.as_tensor(
        scorer.score([0, 1, 2], best.numpy()), dtype=torch.float32
    ).repeat_interleave(4)
    expected = -((rewards - base) * sequence_log_probs(model, b, samples, 4)).mean()
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["advantage_std"], (rewards - base).std())


def test_greedy_baseline_is_decoded_in_eval_mode():
    """X-modaler's RLTrainer decodes the baseline with model.eval(): with dropout 0.5 the baseline
    of the same weights is the same under every seed, and equals the eval-mode greedy decode."""
    torch.manual_seed(0)
    model = build_captioner(
        "transformer",
        vocab_size=12,
        feat_dim=6,
        d_model=16,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=32,
        dropout=0.5,
        visual_dropout=0.5,
        pred_dropout=0.5,
        max_len=6,
    ).train()
    b, scorer = batch(images=6), LengthScorer()
    baselines = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = scst_step(fake_engine(model), b, scorer=scorer, samples_per_image=2, max_len=6)
        baselines.add(out["baseline"].item())
    assert model.training  # put back in train mode
    model.eval()
    with torch.no_grad():
        enc = model.encode(b["features"], b["boxes"], b["region_mask"])
        best = greedy(model, enc, max_len=6).tokens
    assert len(baselines) == 1
    assert baselines.pop() == pytest.approx(np.mean(scorer.score(np.arange(6), best.numpy())))


def test_policy_gradient_raises_the_reward_of_better_samples():
    model, b, scorer = tiny_model(), batch(1), ShortnessScorer()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    lengths = []
    for step in range(20):
        torch.manual_seed(step)
        out = scst_step(
            fake_engine(model),
            b,
            scorer=scorer,
            baseline="leave_one_out",
            samples_per_image=8,
            max_len=6,
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        lengths.append(out["sample_len"].item())
    assert lengths[0] >= 4.0  # the untrained model runs to max_len or close
    assert np.mean(lengths[-5:]) < 2.0


def test_unknown_sampler_or_baseline_is_an_error():
    with pytest.raises(ValueError, match="sampler must be one of"):
        scst_step(fake_engine(tiny_model()), batch(), scorer=LengthScorer(), baseline="median")
