"""Sample-quality metrics.

Generative perplexity is token-weighted: gen-PPL = exp(Σ_n NLL_n / Σ_n T_n) over samples n with
T_n counted tokens (not the mean of per-sample perplexities, which is a different, higher
number). It is always reported beside the per-sample unigram entropy, because perplexity can be
"won" by collapsing diversity.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class Evaluator(Protocol):
    """Scores token sequences with a model that shaped and trained nothing here."""

    name: str

    def nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids → (negative log-likelihood per sample (B,) float64 nats,
        number of tokens counted per sample (B,))."""
        ...


class ExactEvaluator:
    """The synthetic language's own exact likelihood: the truth, nothing to game."""

    name = "exact"

    def __init__(self, language):
        self.language = language

    def nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.cpu()
        return -self.language.log_likelihood(x), torch.full((x.shape[0],), x.shape[1])


def generative_perplexity(nll: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """exp(Σ nll / Σ tokens)."""
    return math.exp(float(nll.double().sum() / n_tokens.double().sum()))


def unigram_entropy(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-sample entropy (nats) of the empirical token distribution; (B, L) → (B,) float64."""
    B = x.shape[0]
    counts = torch.zeros(B, vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, x.cpu().long(), torch.ones(x.shape, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)
