"""Chunked retrieval evaluation equals scoring the full matrix directly."""

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from datasets import load_from_disk

from xmodaler_accel.config import Config
from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.metrics.retrieval import recall_at_k
from xmodaler_accel.models.retrieval import build_single_stream, build_two_stream
from xmodaler_accel.tasks.retrieval.evaluation import (
    EvalSettings,
    RetrievalSplit,
    embed_split,
    evaluate_retrieval,
    full_ranks,
    rerank_ranks,
)

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 11, "num_test": 0}
TWO = Config(
    {
        "hidden": 32,
        "embed_dim": 16,
        "image_layers": 1,
        "text_encoder": "transformer",
        "text_layers": 1,
        "heads": 2,
        "dropout": 0.0,
        "loss": "max_violation",
        "margin": 0.2,
        "temperature": 0.07,
    }
)
SINGLE = Config(
    {
        "bert_dir": "",
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "intermediate": 64,
        "dropout": 0.0,
        "pooling": "cls",
    }
)
SETTINGS = EvalSettings(batch_size=60, image_chunk=3, similarity_chunk=4)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = synthetic_dir(tmp_path_factory.mktemp("synthetic"), **SYNTHETIC)
    tokenizer = load_tokenizer(root / "wordpiece")
    return RetrievalSplit.from_table("val", load_from_disk(str(root))["val"], tokenizer)


@pytest.fixture()
def models(split):
    vocab = int(split.input_ids.max()) + 1
    torch.manual_seed(0)
    two = build_two_stream(TWO, feat_dim=16, vocab_size=vocab, pad_id=0).eval()
    single = build_single_stream(SINGLE, feat_dim=16, vocab_size=vocab, pad_id=0).eval()
    return two, single


def direct_single_stream_scores(model, split):
    """Every pair scored one image at a time, no chunking."""
    rows = []
    with torch.no_grad():
        for image in range(split.num_images):
            regions = split.regions([image] * split.num_captions, "cpu", 50)
            rows.append(model(split.input_ids, split.attention_mask, **regions))
    return torch.stack(rows)


def test_split_lists_every_caption_with_its_image(split):
    assert split.num_images == 11 and split.num_captions == 55
    assert split.caption_image.tolist() == [i for i in range(11) for _ in range(5)]
    assert split.attention_mask[:, 0].all()


def test_two_stream_chunked_evaluation_equals_the_full_similarity_matrix(split, models):
    two, _ = models
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        results = evaluate_retrieval(accelerator, two, [split], SETTINGS)
        images = two.embed_images(**split.regions(range(split.num_images), "cpu", 50))
        texts = two.embed_texts(split.input_ids, split.attention_mask)
    expected = recall_at_k(images @ texts.T, split.caption_image)
    assert set(results) == {"val"}
    assert results["val"] == pytest.approx(expected, abs=1e-6)


def test_single_stream_full_scoring_equals_scoring_pair_by_pair(split, models):
    _, single = models
    accelerator = Accelerator(cpu=True)
    ranks, pairs = full_ranks(accelerator, single, split, SETTINGS)
    assert pairs == split.num_images * split.num_captions
    expected = recall_at_k(direct_single_stream_scores(single, split), split.caption_image)
    assert ranks.metrics() == pytest.approx(expected, abs=1e-6)


def test_reranking_every_candidate_equals_full_scoring(split, models):
    two, single = models
    accelerator = Accelerator(cpu=True)
    everything = replace(SETTINGS, batch_size=275, rerank_k=split.num_captions)
    images, texts = embed_split(accelerator, two, split, everything)
    reranked, pairs = rerank_ranks(accelerator, single, images, texts, split, everything)
    full, _ = full_ranks(accelerator, single, split, SETTINGS)
    # i2t sees all captions; t2i sees min(k, images) = all images.
    assert pairs == 2 * split.num_images * split.num_captions
    assert reranked.metrics() == pytest.approx(full.metrics(), abs=1e-6)


@pytest.mark.parametrize("rerank_k", [0, 20])
def test_no_single_stream_forward_exceeds_the_eval_batch_size(split, models, rerank_k):
    two, single = models
    sizes = []
    single.register_forward_hook(lambda module, args, out: sizes.append(len(out)))
    settings = replace(SETTINGS, batch_size=30, image_chunk=4, rerank_k=rerank_k)
    with torch.no_grad():
        evaluate_retrieval(Accelerator(cpu=True), single, [split], settings, two)
    # Re-ranking scores image_chunk x k = 80 pairs per image block: split into forwards of 30.
    assert sizes and max(sizes) <= 30


def test_reranking_reports_the_two_stream_candidates_too(split, models):
    two, single = models
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        results = evaluate_retrieval(
            accelerator, single, [split], replace(SETTINGS, rerank_k=2), two
        )
        plain = evaluate_retrieval(accelerator, two, [split], SETTINGS)
    assert set(results) == {"val", "val_two_stream"}
    assert results["val_two_stream"] == plain["val"]
    # With only the top-2 rescored, R@5 and R@10 can be no higher than R@2 of the candidates.
    assert results["val"]["i2t_R@10"] == results["val"]["i2t_R@5"]


def test_reranking_needs_a_two_stream_model(split, models):
    _, single = models
    with pytest.raises(ValueError, match="rerank"):
        evaluate_retrieval(Accelerator(cpu=True), single, [split], replace(SETTINGS, rerank_k=2))
