import math

import pytest
import torch

from tsdfm.models.losses import cross_entropy_loss, generalized_kl_loss
from tsdfm.models.path import MixturePath, PolynomialScheduler


def test_cross_entropy_counts_only_masked_positions_under_mask_source():
    V = 4
    path = MixturePath(PolynomialScheduler(), "mask", V, V)
    logits = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.25] * 4]]))
    x_1 = torch.tensor([[0, 3]])
    x_t = torch.tensor([[V, 3]])  # first masked, second revealed
    assert cross_entropy_loss(logits, x_1, x_t, path).item() == pytest.approx(-math.log(0.7))
    uni = MixturePath(PolynomialScheduler(), "uniform", V)
    both = (-math.log(0.7) - math.log(0.25)) / 2
    assert cross_entropy_loss(logits, x_1, x_t.clamp(max=3), uni).item() == pytest.approx(both)


def test_generalized_kl_matches_its_equation():
    V = 3
    path = MixturePath(PolynomialScheduler(2.0), "uniform", V)
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]])
    x_1 = torch.tensor([[0, 2]])
    x_t = torch.tensor([[0, 1]])  # position 0 already equals x_1, position 1 does not
    t = torch.tensor([0.5])
    coef = 2 * 0.5 / (1 - 0.25)
    l0 = -coef * (0.6 - 1.0)
    l1 = -coef * (0.5 - 0.0 + math.log(0.3))
    got = generalized_kl_loss(torch.log(p), x_1, x_t, t, path).item()
    assert got == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_generalized_kl_under_mask_is_weighted_cross_entropy():
    V = 5
    path = MixturePath(PolynomialScheduler(), "mask", V, V)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, V, generator=g)
    x_1 = torch.randint(0, V, (2, 6), generator=g)
    x_t = torch.where(torch.rand(2, 6, generator=g) < 0.5, x_1, torch.full_like(x_1, V))
    t = torch.tensor([0.2, 0.6])
    logp = torch.log_softmax(logits, -1).gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    masked = (x_t == V).float()
    revealed_p = torch.softmax(logits, -1).gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    coef = (1 / (1 - t)).view(-1, 1)
    expected = (coef * (masked * -logp + (1 - masked) * (1 - revealed_p))).mean()
    torch.testing.assert_close(generalized_kl_loss(logits, x_1, x_t, t, path), expected)
