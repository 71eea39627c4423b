import itertools
import json
import math

import numpy as np
import pytest
import torch

from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage
from tsdfm.models.errors import ConfigError, DataError


def _all_sequences(lang):
    return torch.tensor(list(itertools.product(range(lang.vocab_size), repeat=lang.seq_len)))


def test_exact_likelihood_sums_to_one_over_all_sequences():
    lang = SyntheticLanguage.generate(
        LanguageConfig(vocab_size=5, num_states=3, branching=2, smoothing=0.1, seq_len=4, seed=1)
    )
    seqs = _all_sequences(lang)  # 625 sequences
    p = lang.log_likelihood(seqs).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the exact entropy formula equals the entropy of the enumerated distribution
    h = -(p * p.log()).sum().item() / lang.seq_len
    assert lang.entropy_per_token() == pytest.approx(h, rel=1e-10)


def test_sampler_frequencies_match_exact_probabilities():
    lang = SyntheticLanguage.generate(
        LanguageConfig(vocab_size=3, num_states=2, branching=2, smoothing=0.1, seq_len=3, seed=4)
    )
    seqs = _all_sequences(lang)
    p = lang.log_likelihood(seqs).exp()
    n = 100_000
    x = lang.sample(n, torch.Generator().manual_seed(0))
    idx = (x * torch.tensor([9, 3, 1])).sum(1)
    freq = torch.bincount(idx, minlength=27).double() / n
    assert (freq - p).abs().max().item() < 5 * math.sqrt(p.max().item() / n)


def test_monte_carlo_entropy_agrees_with_the_exact_value(tiny_language):
    x = tiny_language.sample(20000, torch.Generator().manual_seed(1))
    nll = -tiny_language.log_likelihood(x) / tiny_language.seq_len
    se = nll.std().item() / math.sqrt(len(nll))
    assert abs(nll.mean().item() - tiny_language.entropy_per_token()) < 4 * se


def test_json_round_trip_gives_identical_likelihoods(tmp_path, tiny_language):
    tiny_language.save(tmp_path / "lang.json")
    again = SyntheticLanguage.load(tmp_path / "lang.json")
    x = tiny_language.sample(64, torch.Generator().manual_seed(2))
    assert torch.equal(tiny_language.log_likelihood(x), again.log_likelihood(x))
    raw = json.loads((tmp_path / "lang.json").read_text())
    # anyone can recompute a likelihood from the JSON alone
    s, logp = raw["start_state"], 0.0
    for tok in x[0].tolist():
        logp += math.log(raw["emission"][s][tok])
        s = raw["transition"][s][tok]
    assert logp == pytest.approx(tiny_language.log_likelihood(x[:1]).item(), rel=1e-12)


def test_generation_is_deterministic_per_seed():
    a = SyntheticLanguage.generate(LanguageConfig(seed=5))
    b = SyntheticLanguage.generate(LanguageConfig(seed=5))
    c = SyntheticLanguage.generate(LanguageConfig(seed=6))
    assert np.array_equal(a.emission, b.emission) and np.array_equal(a.transition, b.transition)
    assert not np.array_equal(a.emission, c.emission)


def test_default_language_punishes_independent_neighbours():
    """Drawing every token independently from its exact marginal (what one parallel step does)
    is far worse than the language itself: the benchmark can see few-step damage."""
    lang = SyntheticLanguage.generate(LanguageConfig())
    g = torch.Generator().manual_seed(0)
    x = lang.sample(4000, g)
    shuffled = torch.stack([col[torch.randperm(len(col), generator=g)] for col in x.T], dim=1)
    ppl_real = math.exp((-lang.log_likelihood(x)).mean().item() / lang.seq_len)
    ppl_indep = math.exp((-lang.log_likelihood(shuffled)).mean().item() / lang.seq_len)
    assert ppl_real == pytest.approx(lang.perplexity(), rel=0.02)
    assert ppl_indep > 10 * ppl_real


def test_bad_language_inputs(tmp_path, tiny_language):
    with pytest.raises(ConfigError, match="branching"):
        LanguageConfig(vocab_size=4, branching=5)
    with pytest.raises(ConfigError, match="smoothing"):
        LanguageConfig(smoothing=1.5)
    with pytest.raises(DataError, match="token ids must lie in"):
        tiny_language.log_likelihood(torch.tensor([[0, 99]]))
    with pytest.raises(DataError, match="does not exist"):
        SyntheticLanguage.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a synthetic language"):
        SyntheticLanguage.load(tmp_path / "bad.json")
