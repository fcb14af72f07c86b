"""Each pretraining objective against a direct computation on a small case."""

import math

import pytest
import torch
import torch.nn.functional as F

from xmodaler_accel.objectives import (
    IGNORE_INDEX,
    caption_loss,
    itm_accuracy,
    itm_loss,
    masked_accuracy,
    masked_lm_loss,
    region_accuracy,
    region_feature_loss,
    region_kl_loss,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_masked_lm_loss_is_the_mean_negative_log_likelihood_of_masked_tokens(gen):
    logits = torch.randn(2, 4, 6, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5], [0, IGNORE_INDEX, IGNORE_INDEX, 2]])
    terms = []
    for b in range(2):
        for t in range(4):
            if labels[b, t] != IGNORE_INDEX:
                row = logits[b, t]
                terms.append(-(row[labels[b, t]] - math.log(row.exp().sum())))
    expected = sum(terms) / len(terms)
    assert masked_lm_loss(logits, labels).item() == pytest.approx(float(expected), rel=1e-5)


def test_masked_lm_loss_and_accuracy_are_zero_without_masked_tokens(gen):
    logits = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = masked_lm_loss(logits, labels)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()  # still differentiable
    assert masked_accuracy(logits, labels).item() == 0.0


def test_masked_accuracy_counts_only_labelled_positions():
    logits = torch.zeros(1, 4, 3)
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 0])] = 1.0  # predictions 0 1 2 0
    labels = torch.tensor([[0, 2, IGNORE_INDEX, 0]])  # right, wrong, ignored, right
    assert masked_accuracy(logits, labels).item() == pytest.approx(2 / 3)


def test_region_kl_loss_is_the_kl_divergence_at_masked_regions(gen):
    logits = torch.randn(2, 3, 4, generator=gen)
    target = torch.softmax(torch.randn(2, 3, 4, generator=gen), -1)
    target[0, 1] = torch.tensor([0.0, 0.5, 0.5, 0.0])  # zero probabilities contribute nothing
    picked = torch.tensor([[True, True, False], [False, False, True]])
    kls = []
    for b, n in picked.nonzero().tolist():
        p, log_q = target[b, n], logits[b, n].log_softmax(-1)
        kls.append(sum(p[c] * (math.log(p[c]) - log_q[c]) for c in range(4) if p[c] > 0))
    expected = sum(kls) / len(kls)
    assert region_kl_loss(logits, target, picked).item() == pytest.approx(float(expected), rel=1e-5)
    # ... which is X-modaler's KLDivLoss(reduction="none") summed and divided by the regions
    xmodaler = F.kl_div(logits[picked].log_softmax(-1), target[picked], reduction="none")
    assert region_kl_loss(logits, target, picked).item() == pytest.approx(
        (xmodaler.sum() / picked.sum()).item(), rel=1e-5
    )


def test_region_feature_loss_is_the_mean_squared_error_of_masked_regions(gen):
    predicted, target = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    picked = torch.tensor([[True, False, True], [False, True, False]])
    expected = F.mse_loss(predicted[picked], target[picked])  # X-modaler's MSELoss("mean")
    assert region_feature_loss(predicted, target, picked).item() == pytest.approx(expected.item())
    assert region_feature_loss(predicted, target, torch.zeros_like(picked)).item() == 0.0


def test_region_accuracy_compares_with_the_detectors_top_class():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
    target = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]]])
    picked = torch.tensor([[True, True, False]])
    assert region_accuracy(logits, target, picked).item() == pytest.approx(0.5)


def test_itm_loss_is_binary_cross_entropy_over_valid_pairs():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    valid = torch.tensor([True, True, True, False])

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = [bce(x, y) for x, y in zip(logits.tolist(), labels.tolist())]
    assert itm_loss(logits, labels).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert itm_loss(logits, labels, valid).item() == pytest.approx(sum(expected[:3]) / 3, rel=1e-6)
    assert itm_accuracy(logits, labels).item() == pytest.approx(0.75)
    assert itm_accuracy(logits, labels, valid).item() == pytest.approx(2 / 3)


def test_caption_loss_is_cross_entropy_and_smooths_like_label_smoothing(gen):
    logits = torch.randn(2, 3, 5, generator=gen)
    targets = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    plain = F.cross_entropy(logits.view(-1, 5), targets.view(-1), ignore_index=IGNORE_INDEX)
    assert caption_loss(logits, targets).item() == pytest.approx(plain.item(), rel=1e-6)
    eps, valid = 0.1, targets != IGNORE_INDEX
    log_p = logits.log_softmax(-1)[valid]
    smooth = torch.full_like(log_p, eps / 4)
    smooth[torch.arange(len(log_p)), targets[valid]] = 1 - eps
    expected = -(smooth * log_p).sum(-1).mean()
    got = caption_loss(logits, targets, smoothing=eps)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
