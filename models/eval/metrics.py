"""Sample-quality metrics.

Generative perplexity is token-weighted: gen-PPL = exp(Σ_n NLL_n / Σ_n T_n) over samples n with
T_n counted tokens (not the mean of per-sample perplexities, which is a different, higher
number). It is always reported beside the per-sample unigram entropy, because perplexity can be
"won" by collapsing diversity.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch


class Evaluator(Protocol):
    """Scores a generator's token sequences with a model that shaped and trained nothing here.

    An evaluator is loaded once and bound to each generator checkpoint whose tokens it reads
    (:meth:`bind`): the exact evaluator to the checkpoint's synthetic language, a language-model
    evaluator to the checkpoint's tokenizer, which decodes the tokens to text.

    Attributes:
        name: short label for reports (``"exact"``, ``"lm"``, ``"hf"``, ``"smollm2"``).
    """

    name: str

    def bind(self, ckpt: Any) -> Evaluator:
        """This evaluator reading the tokens of ``ckpt`` (a ``tsdfm.models.checkpoint.Checkpoint``);
        raises a ``TsdfmError`` naming the fix when it cannot score that checkpoint."""
        ...

    def nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids → (negative log-likelihood per sample (B,) float64 nats,
        number of tokens counted per sample (B,)), in the evaluator's tokens."""
        ...

    def describe(self) -> dict:
        """JSON-able: name, identity, which tokens the perplexity is weighted by, details."""
        ...


class ExactEvaluator:
    """The synthetic language's own exact likelihood: the truth, nothing to game.

    NLL(x) = −log p(x_{1:L}) = −Σ_t log E[s_t, x_t], counted over all L generator tokens.

    Args:
        language: the language; None gives an unbound evaluator that :meth:`bind` completes
            with a checkpoint's own language.
    """

    name = "exact"

    def __init__(self, language=None):
        self.language = language

    def bind(self, ckpt: Any) -> ExactEvaluator:
        from tsdfm.models.data.sources import load_language
        from tsdfm.models.errors import ConfigError

        kind = ckpt.config.data.get("kind", "unknown")
        if kind != "synthetic":
            raise ConfigError(
                f"the exact evaluator scores only checkpoints of the synthetic language, but "
                f"{ckpt.spec} was trained on {kind} data; pass --evaluator lm:DIR, hf:DIR or "
                "smollm2"
            )
        return ExactEvaluator(load_language(ckpt.directory, ckpt.config.data))

    def nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.language is not None, "bind the exact evaluator to a checkpoint first"
        x = x.cpu()
        return -self.language.log_likelihood(x), torch.full((x.shape[0],), x.shape[1])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "identity": None,
            "tokens": "generator",
            "description": "exact likelihood of the synthetic language the generator learned",
        }


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


def _ngram_codes(x: torch.Tensor, n: int, base: int) -> torch.Tensor | None:
    """(B, L) → (B, L − n + 1) int64 codes Σ_k x_{i+k}·base^k of each n-gram, or None when
    base^n overflows int64."""
    if base**n >= 2**63:
        return None
    weights = torch.tensor([base**k for k in range(n)], dtype=torch.long)
    return (x.unfold(1, n, 1).long() * weights).sum(-1)


def distinct_n(x: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Distinct-n: the fraction of n-grams that are unique.

    Per sample b: |{n-grams of x_b}| / (L − n + 1); over the whole set: |∪_b {n-grams of x_b}|
    / (B·(L − n + 1)). Low values mean repetition (within a sample) or collapse (across samples).

    Args:
        x: (B, L) token ids, L ≥ n.
        n: n-gram order ≥ 1.

    Returns:
        (B,) float64 per-sample distinct-n, and the set-level distinct-n.
    """
    x = x.cpu().long()
    B, L = x.shape
    if not 1 <= n <= L:
        from tsdfm.models.errors import ConfigError

        raise ConfigError(f"distinct-{n} needs n >= 1 and sequences of >= n tokens, got L={L}")
    codes = _ngram_codes(x, n, int(x.max()) + 1 if x.numel() else 1)
    if codes is None:
        grams = x.unfold(1, n, 1)  # (B, W, n)
        per = torch.tensor([torch.unique(g, dim=0).shape[0] for g in grams], dtype=torch.float64)
        total = torch.unique(grams.reshape(-1, n), dim=0).shape[0]
    else:
        s = codes.sort(1).values
        per = ((s[:, 1:] != s[:, :-1]).sum(1) + 1).double()
        total = torch.unique(codes).numel()
    W = L - n + 1
    return per / W, total / (B * W)
