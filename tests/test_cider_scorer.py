"""Vectorised CIDEr-D / BLEU-4 rewards equal the per-candidate formulas and pycocoevalcap: always
on the checked-in caption fixture (tests/fixtures/captions), and on Flickr8k where
../shared/data/flickr8k exists."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import CAPTIONS_FIXTURE, FLICKR8K, SOURCES
from xmodaler_accel.metrics import tokenize_lines
from xmodaler_accel.scoring import CiderD, RefCorpus, RewardScorer
from xmodaler_accel.scoring import cider_reference as ref
from xmodaler_accel.scoring.bleu import bleu_counts, sentence_bleu
from xmodaler_accel.scoring.ngrams import EXACT_BASE, HASH_BASE
from xmodaler_accel.scoring.tensors import as_token_array

EOS, PAD = 0, 1
TOL = 1e-9


def _flickr8k(split: str) -> dict[str, list[str]]:
    """Captions of one split: {image: [5 captions]}."""
    captions: dict[str, list[str]] = {}
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf8").splitlines():
        key, caption = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(caption)
    names = (FLICKR8K / f"Flickr_8k.{split}Images.txt").read_text().split()
    return {name: captions[name] for name in names if name in captions}


def _fixture() -> list[dict]:
    """The checked-in fixture's images: references (1-7) and written candidates (1-3)."""
    images = json.loads(CAPTIONS_FIXTURE.read_text(encoding="utf8"))["images"]
    assert len(images) >= 100
    return images


@pytest.fixture(scope="module", params=SOURCES)
def train(request) -> tuple[list[str], list[list[list[int]]], int]:
    """Train split (the fixture's references) as token ids (0 = EOS, 1 = pad): image names, refs,
    vocabulary size."""
    if request.param == "flickr8k":
        split = _flickr8k("train")
    else:
        split = {x["image"]: x["references"] for x in _fixture()}
    words = tokenize_lines([c for caps in split.values() for c in caps])
    vocab = {"<eos>": EOS, "<pad>": PAD}
    ids = [[vocab.setdefault(w, len(vocab)) for w in s.split()] for s in words]
    refs, start = [], 0
    for caps in split.values():
        refs.append(ids[start : start + len(caps)])
        start += len(caps)
    return list(split), refs, len(vocab)


@pytest.fixture(scope="module")
def scorer(train) -> CiderD:
    names, refs, _ = train
    return CiderD.from_corpus(refs, names, eos_id=EOS, pad_id=PAD)


def _candidates(refs: list, vocab_size: int, count: int = 300) -> tuple[list[int], list[list[int]]]:
    """Real, shuffled, truncated, repeated-word, doubled, out-of-corpus and empty candidates."""
    rng = random.Random(0)
    index, cands = [], []
    for b in range(count):
        i = rng.randrange(len(refs))
        own = list(refs[i][b % len(refs[i])])
        other = list(refs[rng.randrange(len(refs))][0])
        kind = b % 8
        cand = [
            own,
            other,
            own[: 1 + b % 4],
            [own[0]] * 7 + [own[-1]] * 3,
            own + own + other,
            own[:3] + [vocab_size + 5, vocab_size + 9] + own[3:],
            [],
            other[:2] + own,
        ][kind]
        index.append(i)
        cands.append(cand + [EOS] + [rng.randrange(2, vocab_size)] * 3 + [PAD] * (b % 3))
    return index, cands


def _reference_scores(refs, index, cands, include_eos=True):
    """The per-candidate formula, with df over the training references."""
    full = [[ref.cut(r + [EOS], EOS, PAD, include_eos) for r in image] for image in refs]
    df, log_n = ref.document_frequency(full)
    cider = [
        ref.cider_d(ref.cut(c, EOS, PAD, include_eos), full[i], df, log_n)
        for i, c in zip(index, cands)
    ]
    bleu = [
        ref.bleu_sentence(ref.cut(c, EOS, PAD, include_eos), full[i])[3]
        for i, c in zip(index, cands)
    ]
    return np.array(cider), np.array(bleu)


def test_vectorised_cider_equals_per_candidate_reference(train, scorer):
    _, refs, vocab_size = train
    index, cands = _candidates(refs, vocab_size)
    expected, _ = _reference_scores(refs, index, cands)
    scores = scorer.score(np.array(index), cands)
    assert scores.shape == (len(cands),) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOL)
    assert scores[6::8].max() == 0.0  # empty candidates
    assert scores[0::8].mean() > 5 * scores[1::8].mean()  # own captions beat shuffled ones


def test_without_eos_token_matches_reference_and_stops_at_pad(train):
    names, refs, vocab_size = train
    scorer = CiderD.from_corpus(refs[:500], names[:500], eos_id=EOS, pad_id=PAD, include_eos=False)
    index, cands = _candidates(refs[:500], vocab_size, count=120)
    cands = [c if k % 2 else [t for t in c if t != EOS] for k, c in enumerate(cands)]
    expected, _ = _reference_scores(refs[:500], index, cands, include_eos=False)
    np.testing.assert_allclose(scorer.score(index, cands), expected, rtol=0, atol=TOL)


def _evaluated(source: str, step: int, images: int | None = None) -> tuple[dict, dict]:
    """Tokenised references and one candidate per key, as pycocoevalcap takes them.

    Flickr8k (the first ``images`` test images): captions 1-4 against caption 0 of image
    ``k * step`` (mod the number of images). The fixture: each written candidate against its
    image's references, then each image against the first candidate of image ``k * step``.
    """
    if source == "flickr8k":
        split = dict(list(_flickr8k("test").items())[:images])
        words = tokenize_lines([c for caps in split.values() for c in caps])
        gts = {k: words[5 * i + 1 : 5 * i + 5] for i, k in enumerate(split)}
        res = {k: [words[5 * ((i * step) % len(split))]] for i, k in enumerate(split)}
        return gts, res
    data = _fixture()
    pairs = [(f"{x['image']}#{j}", x, c) for x in data for j, c in enumerate(x["candidates"])]
    pairs += [
        (f"{x['image']}~", x, data[(i * step) % len(data)]["candidates"][0])
        for i, x in enumerate(data)
    ]
    refs = tokenize_lines([r for _, x, _ in pairs for r in x["references"]])
    cands = tokenize_lines([c for _, _, c in pairs])
    gts, res, start = {}, {}, 0
    for (key, x, _), cand in zip(pairs, cands):
        end = start + len(x["references"])
        gts[key], res[key], start = refs[start:end], [cand], end
    return gts, res


@pytest.mark.parametrize("source", SOURCES)
def test_cider_equals_pycocoevalcap_with_df_from_evaluated_refs(source):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    gts, res = _evaluated(source, step=7)
    _, expected = Cider().compute_score(gts, res)
    vocab: dict[str, int] = {}
    ids = {
        k: [[vocab.setdefault(w, len(vocab)) for w in s.split()] for s in v] for k, v in gts.items()
    }
    scorer = CiderD.from_corpus(list(ids.values()), eos_id=None, include_eos=False)
    cands = [[vocab.setdefault(w, len(vocab)) for w in res[k][0].split()] for k in gts]
    np.testing.assert_allclose(
        scorer.score(np.arange(len(cands)), cands), expected, rtol=0, atol=TOL
    )


@pytest.mark.parametrize("source", SOURCES)
def test_sentence_bleu_equals_pycocoevalcap_per_image(source):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _evaluated(source, step=3, images=300)
    _, expected = Bleu(4).compute_score(gts, res, verbose=0)
    vocab: dict[str, int] = {}
    refs = [[[vocab.setdefault(w, len(vocab)) for w in s.split()] for s in v] for v in gts.values()]
    cands = [[vocab.setdefault(w, len(vocab)) for w in v[0].split()] for v in res.values()]
    corpus = RefCorpus.build(refs, eos_id=None, include_eos=False)
    stats = corpus.match(np.arange(len(cands)), as_token_array(cands))
    ours = sentence_bleu(bleu_counts(stats, corpus))
    np.testing.assert_allclose(ours.T, np.array(expected), rtol=0, atol=TOL)


def test_several_samples_per_image_as_torch_tensors(train, scorer):
    _, refs, vocab_size = train
    index, cands = _candidates(refs, vocab_size, count=40)
    width = max(map(len, cands))
    batch = torch.full((len(cands), width), PAD, dtype=torch.long)
    for b, c in enumerate(cands):
        batch[b, : len(c)] = torch.tensor(c)
    samples = batch.repeat_interleave(5, dim=0)
    image_index = torch.tensor(index).repeat_interleave(5)
    scores = scorer.score(image_index, samples)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64
    expected, _ = _reference_scores(refs, index, cands)
    np.testing.assert_allclose(scores.numpy(), np.repeat(expected, 5), rtol=0, atol=TOL)
    assert np.array_equal(scorer.index_of([scorer.image_ids[i] for i in index]), index)


def test_reward_scorer_adds_weighted_bleu4(train):
    names, refs, vocab_size = train
    reward = RewardScorer.from_corpus(refs, names, eos_id=EOS, pad_id=PAD, bleu_weight=0.5)
    index, cands = _candidates(refs, vocab_size, count=160)
    cider, bleu = _reference_scores(refs, index, cands)
    np.testing.assert_allclose(reward.score(index, cands), cider + 0.5 * bleu, rtol=0, atol=TOL)
    assert set(reward.terms(index, cands)) == {"CIDEr", "Bleu_4"}


def test_large_vocabularies_use_the_hash_and_score_the_same(train, scorer):
    names, refs, vocab_size = train
    shift = 100_000
    big = [[[t + shift if t > PAD else t for t in r] for r in image] for image in refs[:300]]
    hashed = CiderD.from_corpus(big, eos_id=EOS, pad_id=PAD)
    exact = CiderD.from_corpus(refs[:300], eos_id=EOS, pad_id=PAD)
    assert hashed.corpus.base == HASH_BASE and exact.corpus.base == EXACT_BASE
    index, cands = _candidates(refs[:300], vocab_size, count=80)
    big_cands = [[t + shift if t > PAD else t for t in c] for c in cands]
    np.testing.assert_allclose(hashed.score(index, big_cands), exact.score(index, cands), atol=TOL)


def test_missing_cache_is_built_then_reused(train, tmp_path, monkeypatch):
    names, refs, _ = train
    path = tmp_path / "flickr8k" / "cider_df.npz"
    first = CiderD.from_corpus(refs[:400], eos_id=EOS, pad_id=PAD, cache_path=path)
    assert path.exists()

    def no_rebuild(*_):
        raise AssertionError("document frequencies recomputed despite a valid cache")

    monkeypatch.setattr(RefCorpus, "_doc_frequencies", no_rebuild)
    again = CiderD.from_corpus(refs[:400], eos_id=EOS, pad_id=PAD, cache_path=path)
    index, cands = _candidates(refs[:400], 50, count=60)
    np.testing.assert_array_equal(again.score(index, cands), first.score(index, cands))


def test_stale_cache_is_never_used(train, tmp_path):
    names, refs, vocab_size = train
    path = tmp_path / "cider_df.npz"
    CiderD.from_corpus(refs[:300], eos_id=EOS, pad_id=PAD, cache_path=path)
    stale_key = np.load(path)["key"].item()
    rebuilt = CiderD.from_corpus(refs[100:400], eos_id=EOS, pad_id=PAD, cache_path=path)
    fresh = CiderD.from_corpus(refs[100:400], eos_id=EOS, pad_id=PAD)
    assert np.load(path)["key"].item() != stale_key
    index, cands = _candidates(refs[100:400], vocab_size, count=60)
    np.testing.assert_array_equal(rebuilt.score(index, cands), fresh.score(index, cands))
    settings = CiderD.from_corpus(
        refs[100:400], eos_id=EOS, pad_id=PAD, include_eos=False, cache_path=path
    )
    assert np.load(path)["key"].item() != stale_key
    assert settings.corpus.settings["include_eos"] is False


def test_unreadable_cache_is_rebuilt(train, tmp_path):
    _, refs, _ = train
    path = tmp_path / "cider_df.npz"
    path.write_bytes(b"not a cache")
    scorer = CiderD.from_corpus(refs[:50], eos_id=EOS, pad_id=PAD, cache_path=path)
    with np.load(path, allow_pickle=False) as data:
        assert int(data["num_images"]) == 50
    assert scorer.score([0], [refs[0][0]])[0] > 0


def test_cache_directory_gets_a_file_named_by_corpus_key(train, tmp_path):
    _, refs, _ = train
    CiderD.from_corpus(refs[:50], eos_id=EOS, pad_id=PAD, cache_path=tmp_path)
    CiderD.from_corpus(refs[50:100], eos_id=EOS, pad_id=PAD, cache_path=tmp_path)
    assert len(list(tmp_path.glob("cider_df_*.npz"))) == 2


def test_bad_inputs_are_named(scorer):
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD.from_corpus([[[2, 3]], []], eos_id=EOS)
    with pytest.raises(ValueError, match="out of range"):
        scorer.score([10**6], [[2, 3]])
    with pytest.raises(ValueError, match="exceeds"):
        scorer.score([0], [[2, 70_000]])
    with pytest.raises(KeyError, match="no references"):
        scorer.index_of(["missing.jpg"])
