"""Decoding: cached == uncached, beam search against exhaustive search, EOS and length handling,
sampling with differentiable log-probs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from xmodaler_accel import decoding
from xmodaler_accel.decoding import beam_search, greedy, sample, score_tokens
from xmodaler_accel.models import CaptionModel, EncoderOutput, build_captioner, transformer
from xmodaler_accel.models.transformer import merge_heads, split_heads

VOCAB, FEAT = 40, 16
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
PAD, BOS, EOS = 0, 1, 2
NEVER = -1e9  # a logit that gives probability 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads suffer on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoded(kind: str, images: int = 3, seed: int = 0) -> tuple[CaptionModel, EncoderOutput]:
    """A small random captioner in eval mode and its encoding of random images."""
    torch.manual_seed(seed)
    model = build_captioner(kind, vocab_size=VOCAB, feat_dim=FEAT, max_len=12, **SIZES[kind])
    model.eval()
    features = torch.randn(images, 6, FEAT)
    mask = torch.ones(images, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return model, model.encode(features, torch.rand(images, 6, 5), mask)


class MarkovCaptioner(CaptionModel):
    """Next-token logits depend only on the previous token: a [V, V] table (tests by hand)."""

    def __init__(self, table: torch.Tensor, max_len: int = 3) -> None:
        super().__init__(table.shape[0], max_len=max_len)
        self.table = nn.Parameter(table.clone())

    def encode(self, features, boxes, region_mask) -> EncoderOutput:
        return EncoderOutput(memory=features, mask=region_mask)

    def decode(self, enc, input_ids):
        return self.table[input_ids]

    def init_state(self, enc):
        return (torch.zeros(enc.rows, dtype=torch.long),)

    def decode_step(self, enc, state, tokens):
        assert enc.memory.shape[0] == enc.rows // enc.group  # memory is never copied per beam
        return self.table[tokens].log_softmax(-1), (tokens,)


def markov(table: torch.Tensor, images: int = 2, max_len: int = 3):
    model = MarkovCaptioner(table, max_len)
    return model, model.encode(torch.zeros(images, 1, 1), None, torch.ones(images, 1, dtype=bool))


def random_table(vocab: int = 6, seed: int = 0) -> torch.Tensor:
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    table[:, [PAD, BOS]] = NEVER
    return table


def exhaustive(table: torch.Tensor, max_len: int, length_norm: float = 0.0):
    """Every caption of at most max_len words (ending at EOS or at max_len) with its score."""
    log_probs = table.log_softmax(-1)
    words = range(EOS, table.shape[0])
    results = []
    for length in range(1, max_len + 1):
        for seq in itertools.product(words, repeat=length):
            if EOS in seq[:-1] or (length < max_len and seq[-1] != EOS):
                continue
            prev = (BOS, *seq[:-1])
            score = sum(log_probs[a, b].item() for a, b in zip(prev, seq))
            results.append((score / length**length_norm, list(seq)))
    return sorted(results, key=lambda r: -r[0])


def strip(row: torch.Tensor) -> list[int]:
    return [t for t in row.tolist() if t != PAD]


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_cached_greedy_equals_recomputing_the_prefix(kind):
    model, enc = encoded(kind)
    with torch.no_grad():
        cached, plain = greedy(model, enc), greedy(model, enc, use_cache=False)
    assert cached.tokens.shape == (3, 12)
    assert torch.equal(cached.tokens, plain.tokens) and torch.equal(cached.mask, plain.mask)
    torch.testing.assert_close(cached.log_probs, plain.log_probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_cached_beam_search_equals_recomputing_the_prefix(kind):
    model, enc = encoded(kind)
    with torch.no_grad():
        cached = beam_search(model, enc, beam_size=3)
        plain = beam_search(model, enc, beam_size=3, use_cache=False)
    assert cached.beams.shape == (3, 3, 12) and cached.sequences.shape == (3, 12)
    assert torch.equal(cached.beams, plain.beams)
    torch.testing.assert_close(cached.beam_scores, plain.beam_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.token_log_probs, plain.token_log_probs, rtol=0, atol=1e-5)
    beams = cached.beams.flatten(0, 1)  # each beam's own history gives its scores
    with torch.no_grad():
        rescored = score_tokens(model, enc.expand(3), beams, beams != PAD)
    torch.testing.assert_close(rescored.view(3, 3, -1), cached.token_log_probs, rtol=0, atol=1e-5)


def test_beam_search_reuses_the_encoding_and_its_cross_attention_keys():
    model, enc = encoded("transformer")
    calls = []
    for layer in model.decoder_layers:
        layer.cross_attn.key_value.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        beam_search(model, enc, beam_size=3)
        sample(model, enc, n=4)
    assert calls == []


@pytest.mark.parametrize("kind", ["transformer", "updown"])
def test_beam_size_one_equals_greedy(kind):
    model, enc = encoded(kind, seed=1)
    with torch.no_grad():
        best, path = beam_search(model, enc, beam_size=1), greedy(model, enc)
    assert torch.equal(best.sequences, path.tokens)
    torch.testing.assert_close(best.scores, path.log_probs.sum(1), rtol=0, atol=1e-5)


def test_beam_search_finds_the_exhaustive_optimum_when_beams_cover_every_prefix():
    table = random_table()
    model, enc = markov(table, max_len=3)
    truth = exhaustive(table, max_len=3)
    with torch.no_grad():
        out = beam_search(model, enc, beam_size=64)
    assert out.beams.shape == (2, 64, 3)
    for image in range(2):
        found = [(s.item(), strip(b)) for s, b in zip(out.beam_scores[image], out.beams[image])]
        assert [seq for _, seq in found[:10]] == [seq for _, seq in truth[:10]]
        for (score, _), (expected, _) in zip(found[:10], truth[:10]):
            assert score == pytest.approx(expected, abs=1e-5)


def test_beams_are_sorted_and_finished_beams_stop_growing():
    table = random_table(vocab=8, seed=4)
    table[:, EOS] += 1.5  # captions end early, at different steps
    model, enc = markov(table, max_len=6)
    with torch.no_grad():
        out = beam_search(model, enc, beam_size=4)
    assert (out.beam_scores[:, :-1] >= out.beam_scores[:, 1:]).all()
    ended = 0
    for beam, lp, score in zip(
        out.beams.view(-1, out.beams.shape[-1]),
        out.token_log_probs.flatten(0, 1),
        out.beam_scores.flatten(),
    ):
        tokens = beam.tolist()
        if EOS in tokens:
            end = tokens.index(EOS)
            assert tokens[end + 1 :] == [PAD] * (len(tokens) - end - 1)
            assert (lp[end + 1 :] == 0).all()
            ended += end + 1 < len(tokens)
        assert PAD not in tokens[: tokens.index(EOS) if EOS in tokens else None]
        assert lp.sum().item() == pytest.approx(score.item(), abs=1e-5)
    assert ended > 0  # some beam finished before the others and was padded


def test_length_normalisation_changes_the_ranking_on_a_hand_built_case():
    table = torch.full((5, 5), NEVER)
    table[BOS, [EOS, 3, 4]] = torch.tensor([0.40, 0.35, 0.25]).log()  # "EOS" now, or "a" ...
    table[3, [EOS, 4]] = torch.tensor([0.99, 0.01]).log()  # ... then "EOS" almost surely
    table[4, EOS] = 0.0
    model, enc = markov(table, images=1, max_len=3)
    with torch.no_grad():
        raw = beam_search(model, enc, beam_size=2)
        normalised = beam_search(model, enc, beam_size=2, length_norm=1.0)
    assert strip(raw.sequences[0]) == [EOS]
    assert raw.scores[0].item() == pytest.approx(torch.tensor(0.40).log().item(), abs=1e-6)
    assert strip(normalised.sequences[0]) == [3, EOS]
    expected = (torch.tensor(0.35).log() + torch.tensor(0.99).log()).item() / 2
    assert normalised.scores[0].item() == pytest.approx(expected, abs=1e-6)
    assert exhaustive(table, 3, length_norm=1.0)[0][1] == [3, EOS]


def test_pad_and_bos_are_never_generated():
    table = torch.zeros(5, 5)
    table[:, [PAD, BOS]] = 10.0  # the model loves them
    model, enc = markov(table, max_len=4)
    with torch.no_grad():
        outputs = [greedy(model, enc).tokens, sample(model, enc, n=8).tokens]
        outputs.append(beam_search(model, enc, beam_size=3).beams.flatten(0, 1))
    for tokens in outputs:
        for row in tokens.tolist():
            before_eos = row[: row.index(EOS)] if EOS in row else row
            assert BOS not in row and PAD not in before_eos


def test_samples_have_n_rows_per_image_mask_and_pad_after_eos():
    model, enc = encoded("transformer")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = sample(model, enc, n=4, generator=gen)
    rows, length = out.tokens.shape
    assert rows == 12 and length <= 12 and out.log_probs.shape == out.mask.shape == (rows, length)
    ended_before = torch.cumsum(out.tokens == EOS, dim=1) - (out.tokens == EOS).long() > 0
    assert torch.equal(out.mask, ~ended_before)
    assert (out.tokens[~out.mask] == PAD).all() and (out.log_probs[~out.mask] == 0).all()
    greedy_rows = sample(model, enc, n=4, temperature=0).tokens
    path = greedy(model, enc).tokens
    assert torch.equal(greedy_rows, path.repeat_interleave(4, dim=0))  # image-major rows


def test_sample_log_probs_are_the_step_log_softmax_at_the_drawn_tokens_with_grad():
    model, enc = encoded("transformer")
    out = sample(model, enc, n=2, generator=torch.Generator().manual_seed(1))
    assert out.log_probs.requires_grad
    enc_n = enc.expand(2)
    state, tokens, expected = model.init_state(enc_n), torch.full((6,), BOS), []
    with torch.no_grad():
        for t in range(out.tokens.shape[1]):
            log_probs, state = model.decode_step(enc_n, state, tokens)
            tokens = out.tokens[:, t]
            expected.append(log_probs.gather(1, tokens[:, None]).squeeze(1))
    expected = torch.stack(expected, 1).masked_fill(~out.mask, 0.0)
    torch.testing.assert_close(out.log_probs.detach(), expected, rtol=0, atol=1e-5)
    rescored = score_tokens(model, enc_n, out.tokens, out.mask)  # one teacher-forced pass
    torch.testing.assert_close(rescored, out.log_probs, rtol=0, atol=1e-5)
    out.log_probs.sum().backward()  # through the decoder and the shared encoding
    assert model.visual_embed.features.weight.grad.abs().sum() > 0


def test_low_temperature_sampling_approaches_greedy():
    model, enc = encoded("transformer", seed=2)
    with torch.no_grad():
        path = greedy(model, enc).tokens
        cold = sample(model, enc, temperature=1e-4, generator=torch.Generator().manual_seed(0))
        hot = sample(model, enc, n=4, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold.tokens, path)
    assert not torch.equal(hot.tokens[:, : path.shape[1]], path.repeat_interleave(4, 0))


def test_sampling_is_reproducible_with_a_generator():
    model, enc = markov(random_table(), max_len=6)
    first = sample(model, enc, n=5, generator=torch.Generator().manual_seed(7)).tokens
    again = sample(model, enc, n=5, generator=torch.Generator().manual_seed(7)).tokens
    other = sample(model, enc, n=5, generator=torch.Generator().manual_seed(8)).tokens
    assert torch.equal(first, again) and not torch.equal(first, other)


# ------------------------------------------------------------------ no host read per token
def all_decodes(model, enc, generator_seed=0):
    gen = torch.Generator().manual_seed(generator_seed)
    out = sample(model, enc, n=3, generator=gen)
    beams = beam_search(model, enc, beam_size=3, length_norm=1.0)
    return [greedy(model, enc).tokens, out.tokens, out.log_probs, out.mask, beams.beams]


@pytest.mark.parametrize("kind", ["transformer", "updown"])
@pytest.mark.parametrize("every", [3, 4, 50])
def test_reading_the_stop_condition_every_few_steps_changes_nothing(kind, every, monkeypatch):
    """What an accelerator runs (a host read every few steps, extra steps cut off) gives the
    outputs of reading it every step, shapes included; also with X-modaler's EOS = PAD."""
    model, enc = encoded(kind)
    markov_model, markov_enc = markov(random_table(), max_len=6)
    markov_model.eos_id = markov_model.pad_id = markov_model.bos_id = 0  # X-modaler's vocabulary
    with torch.no_grad():
        expected = [*all_decodes(model, enc), *all_decodes(markov_model, markov_enc)]
        monkeypatch.setattr(decoding, "stop_check_every", lambda device: every)
        got = [*all_decodes(model, enc), *all_decodes(markov_model, markov_enc)]
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


class ConcatCacheStepper:
    """The previous Transformer step: keys/values grown by concatenation (the reference)."""

    def __init__(self, model):
        self.model = model

    def init_state(self, enc):
        empty = enc.cache[0].new_zeros(enc.rows, self.model.num_heads, 0, self.model.head_dim)
        return (empty,) * (2 * len(self.model.decoder_layers))

    def decode_step(self, enc, state, tokens):
        model, cache = self.model, []
        x = model.token_embed(tokens[:, None], start=state[0].shape[2])
        for i, layer in enumerate(model.decoder_layers):
            attn = layer.self_attn
            q, k, v = (split_heads(t, attn.heads) for t in attn.qkv(x).chunk(3, dim=-1))
            k, v = torch.cat([state[2 * i], k], dim=2), torch.cat([state[2 * i + 1], v], dim=2)
            p = attn.dropout if attn.training else 0.0
            out = attn.out(merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=p)))
            x = layer._rest(out, x, model._memory_kv(enc, i), enc.mask, enc.group)
            cache += [k, v]
        logits = model.predictor(model.pred_dropout(x[:, 0]))
        return logits.float().log_softmax(-1), tuple(cache)

    def reorder_state(self, state, index):
        return tuple(t.index_select(0, index) for t in state)


@pytest.mark.parametrize("training", [False, True])
def test_preallocated_cache_equals_the_concatenating_one_samples_and_dropout_included(
    training, monkeypatch
):
    """Train-mode sampling (SCST) draws the same dropout masks and tokens for a fixed seed."""
    model, enc = encoded("transformer", seed=3)
    model.train(training)
    results = []
    for stepper in (model, ConcatCacheStepper(model)):
        monkeypatch.setattr(decoding, "_stepper", lambda m, use_cache, s=stepper: s)
        torch.manual_seed(7)
        with torch.no_grad():
            out = sample(model, enc, n=4, generator=torch.Generator().manual_seed(5))
            beams = beam_search(model, enc, beam_size=3).beams
        results.append((out.tokens, out.log_probs, beams))
    (tokens, log_probs, beams), (ref_tokens, ref_log_probs, ref_beams) = results
    assert torch.equal(tokens, ref_tokens) and torch.equal(beams, ref_beams)
    torch.testing.assert_close(log_probs, ref_log_probs, rtol=0, atol=1e-6)


def test_the_preallocated_cache_an_accelerator_uses_gives_the_same_decodes(monkeypatch):
    """The preallocated cache and masked attention over all of it (what a GPU runs, with no
    host value per step) decode as the growing cache the CPU uses does."""
    model, enc = encoded("transformer", seed=4)
    with torch.no_grad():
        expected = all_decodes(model, enc)
        monkeypatch.setattr(transformer, "preallocates_cache", lambda device: True)
        got = all_decodes(model, enc)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # tokens: exactly


def test_the_decoding_step_compiles_as_one_graph_per_batch_shape(monkeypatch):
    """Static shapes and no host value: torch.compile(fullgraph=True) traces the step once per
    number of rows, not once per token (what CUDA-graph capture needs)."""
    model, enc = encoded("transformer", seed=5)
    with torch.no_grad():
        expected = [greedy(model, enc).tokens, beam_search(model, enc, beam_size=3).beams]
    monkeypatch.setattr(transformer, "preallocates_cache", lambda device: True)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(
        model, "decode_step", torch.compile(model.decode_step, backend="eager", fullgraph=True)
    )
    with torch.no_grad():
        got = [greedy(model, enc).tokens, beam_search(model, enc, beam_size=3).beams]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert counters["stats"]["unique_graphs"] == 2  # 3 rows (greedy) and 9 (beams)
    torch._dynamo.reset()
