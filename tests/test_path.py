import pytest
import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.path import MixturePath, PolynomialScheduler, parse_scheduler


@pytest.mark.parametrize("n", [1.0, 2.0])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_path_marginals_match_kappa(source, n):
    V, B, L = 7, 4000, 16
    path = MixturePath(PolynomialScheduler(n), source, V, V if source == "mask" else None)
    g = torch.Generator().manual_seed(0)
    x_1 = torch.randint(0, V, (B, L), generator=g)
    for t in (0.0, 0.3, 0.7, 1.0):
        ps = path.sample(x_1, torch.full((B,), t), g)
        kappa = t**n
        same = (ps.x_t == x_1).double().mean().item()
        # uniform source: a position at its source value equals x_1 by chance with prob 1/V
        expected = kappa if source == "mask" else kappa + (1 - kappa) / V
        assert abs(same - expected) < 0.01, (t, same, expected)
        if source == "mask":
            assert ((ps.x_t == x_1) | (ps.x_t == V)).all()
        else:
            assert ps.x_t.max() < V


def test_scheduler_values_and_errors():
    s = PolynomialScheduler(2.0)
    assert s.kappa(0.5) == 0.25 and s.d_kappa(0.5) == 1.0
    assert parse_scheduler("linear") == PolynomialScheduler(1.0)
    assert parse_scheduler("polynomial:3") == PolynomialScheduler(3.0)
    with pytest.raises(ConfigError, match="unknown scheduler 'cosine'"):
        parse_scheduler("cosine")
    with pytest.raises(ConfigError, match="positive"):
        PolynomialScheduler(0.0)
    with pytest.raises(ConfigError, match="unknown source 'gauss'"):
        MixturePath(PolynomialScheduler(), "gauss", 4, None)
    with pytest.raises(ConfigError, match="mask_token_id"):
        MixturePath(PolynomialScheduler(), "mask", 4, None)
