"""R@K with the Flickr30k protocol on hand-built score matrices, streamed and merged."""

import pytest
import torch

from xmodaler_accel.metrics.retrieval import RetrievalRanks, TopKRanks, recall_at_k

# Two images with two captions each: captions 0, 1 belong to image 0; 2, 3 to image 1.
OWNERS = torch.tensor([0, 0, 1, 1])


def reference_recall(scores: torch.Tensor, owners: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """A direct loop: rank of the best positive = negatives scoring at least as high."""
    out = {}
    i2t = []
    for i in range(scores.shape[0]):
        best = max(scores[i, t] for t in range(scores.shape[1]) if owners[t] == i)
        i2t.append(sum(int(scores[i, t] >= best) for t in range(scores.shape[1]) if owners[t] != i))
    t2i = []
    for t in range(scores.shape[1]):
        pos = scores[owners[t], t]
        t2i.append(sum(int(scores[i, t] >= pos) for i in range(scores.shape[0]) if i != owners[t]))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def test_perfect_scores_give_100():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.0, 0.3, 0.7, 0.9]])
    metrics = recall_at_k(scores, OWNERS, ks=(1,))
    assert metrics == {"i2t_R@1": 100.0, "t2i_R@1": 100.0, "rsum": 200.0}


def test_constant_scores_count_ties_against_the_model():
    metrics = recall_at_k(torch.zeros(2, 4), OWNERS, ks=(1, 5))
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 0.0
    # With only one negative image per caption, a tie still ranks the positive second.
    assert metrics["t2i_R@5"] == 100.0


def test_a_tie_between_positive_and_negative_is_a_miss_at_1():
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.0], [0.0, 0.1, 0.9, 0.9]])
    metrics = recall_at_k(scores, OWNERS, ks=(1, 2))
    # Image 0: its best caption (0.5) ties with caption 2 -> rank 1. Image 1: rank 0.
    assert metrics["i2t_R@1"] == 50.0 and metrics["i2t_R@2"] == 100.0
    # Caption 1 scores 0.1 with both images: a miss; the other three captions are hits.
    assert metrics["t2i_R@1"] == 75.0


def test_several_positives_only_the_best_one_counts_for_i2t():
    # Image 0's captions score 0.2 and 0.95; one negative (0.9) sits between them.
    scores = torch.tensor([[0.2, 0.95, 0.9, 0.1], [0.0, 0.0, 0.9, 0.8]])
    metrics = recall_at_k(scores, OWNERS, ks=(1,))
    assert metrics["i2t_R@1"] == 100.0
    # Caption 0 (image 0 scores 0.2, image 1 scores 0.0): hit; caption 2: 0.9 vs 0.9 tie: miss.
    assert metrics["t2i_R@1"] == 75.0


def test_matches_a_direct_loop_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    owners = torch.arange(12).repeat_interleave(5)
    scores = torch.randn(12, 60, generator=gen).round(decimals=1)  # rounding makes many ties
    expected = reference_recall(scores, owners)
    assert recall_at_k(scores, owners) == pytest.approx(expected, abs=1e-3)


def test_blocks_in_any_order_equal_the_full_matrix():
    gen = torch.Generator().manual_seed(1)
    owners = torch.arange(10).repeat_interleave(5)
    scores = torch.randn(10, 50, generator=gen)
    ranks = RetrievalRanks(owners, 10)
    for rows in torch.randperm(10, generator=gen).split(3):
        for cols in torch.randperm(50, generator=gen).split(7):
            ranks.add_block(rows, cols, scores[rows][:, cols])
    assert ranks.metrics() == recall_at_k(scores, owners)


def test_merging_partial_states_equals_one_state():
    gen = torch.Generator().manual_seed(2)
    owners = torch.arange(8).repeat_interleave(5)
    scores = torch.randn(8, 40, generator=gen)
    parts = []
    for rows in (torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])):
        part = RetrievalRanks(owners, 8)
        part.add_block(rows, torch.arange(40), scores[rows])
        parts.append(part.state())
    merged = RetrievalRanks(owners, 8)
    for state in parts:
        merged.merge(state)
    assert merged.metrics() == recall_at_k(scores, owners)


def test_candidates_left_at_minus_infinity_are_misses():
    ranks = TopKRanks(num_queries=2, k=3)
    scores = torch.tensor([[float("-inf"), 0.3, 0.1], [0.2, float("-inf"), float("-inf")]])
    positive = torch.tensor([[True, False, False], [True, False, False]])
    ranks.update(torch.tensor([0, 1]), scores, positive)
    # Query 0's positive was never scored: a miss at every K; query 1's is first.
    assert ranks.ranks().tolist() == [3, 0]


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]] * 2), OWNERS)
