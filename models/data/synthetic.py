"""An exact-likelihood synthetic language: a sparse unifilar hidden Markov model.

The language is a probabilistic finite automaton with Q hidden states over V tokens:

    s_1 = start
    x_t ~ E[s_t, ·]                 (emission: each state puts most mass on a few tokens)
    s_{t+1} = δ(s_t, x_t)           (deterministic transition: the model is *unifilar*)

E[s] = (1 − ε) · Dirichlet-weighted mass on ``branching`` tokens + ε · uniform, so every
sequence has non-zero probability but a token that does not fit its left context costs about
ln(V/ε) nats. The default δ maps a state and token to the class of that token, so each token's
successors are a small set: neighbouring tokens depend on each other strongly, and drawing
many tokens independently in one step (few-step sampling) visibly breaks sequences.

Because the state path is a function of the tokens, everything is exact:

    log p(x_{1:L}) = Σ_t log E[s_t, x_t]                        (forward algorithm, one path)
    H(X_{1:L})     = Σ_t Σ_s P(S_t = s) · H(E[s, ·])            (H(X_t | X_<t) = H(X_t | S_t))

with P(S_{t+1} = s') = Σ_s P(S_t = s) Σ_x E[s, x] 1[δ(s, x) = s'].
The parameters are saved as JSON so anyone can recompute likelihoods independently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tsdfm.models.errors import ConfigError, DataError

LANGUAGE_FORMAT = "tsdfm-synthetic-language"
LANGUAGE_VERSION = 1
MASK_TOKEN = "[MASK]"

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]


@dataclass(frozen=True)
class LanguageConfig:
    """Parameters of :meth:`SyntheticLanguage.generate`.

    Args:
        vocab_size: V tokens.
        num_states: Q hidden states (token classes under the default transition).
        branching: tokens each state emits with most of its mass.
        concentration: Dirichlet concentration of those emission weights (smaller = more skewed).
        smoothing: ε, mass spread uniformly over all V tokens.
        seq_len: L, the length of every sequence.
        seed: seed of the generator (the language is a pure function of this config).
    """

    vocab_size: int = 128
    num_states: int = 32
    branching: int = 6
    concentration: float = 0.7
    smoothing: float = 0.01
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.num_states < 1 or self.seq_len < 1:
            raise ConfigError(
                "language vocab_size >= 2, num_states >= 1 and seq_len >= 1 are required, got "
                f"{self.vocab_size}, {self.num_states}, {self.seq_len}"
            )
        if not 1 <= self.branching <= self.vocab_size:
            raise ConfigError(
                f"language branching={self.branching} must be between 1 and vocab_size"
            )
        if not 0.0 <= self.smoothing < 1.0 or self.concentration <= 0:
            raise ConfigError(
                "language smoothing must be in [0, 1) and concentration > 0, got "
                f"{self.smoothing}, {self.concentration}"
            )


def _words(n: int) -> list[str]:
    """n distinct pronounceable pseudo-words (deterministic)."""
    syll = [o + v for o in _ONSETS for v in _VOWELS]
    out: list[str] = []
    i = 0
    while len(out) < n:
        a, b = divmod(i, len(syll))
        out.append(syll[b] if a == 0 else syll[a - 1] + syll[b])
        i += 1
    return out


class SyntheticLanguage:
    """A unifilar HMM with exact likelihood and entropy.

    Args:
        emission: (Q, V) float64, rows sum to 1.
        transition: (Q, V) int64, δ(s, x).
        start_state: s_1.
        seq_len: L.
        words: V token strings (for decoding).
        config: the generator config, if it was generated (kept for provenance).
    """

    def __init__(
        self,
        emission: np.ndarray,
        transition: np.ndarray,
        start_state: int,
        seq_len: int,
        words: list[str],
        config: LanguageConfig | None = None,
    ):
        emission = np.asarray(emission, dtype=np.float64)
        transition = np.asarray(transition, dtype=np.int64)
        Q, V = emission.shape
        if transition.shape != (Q, V):
            raise DataError(f"transition shape {transition.shape} != emission shape {(Q, V)}")
        if not np.allclose(emission.sum(1), 1.0, atol=1e-9) or (emission < 0).any():
            raise DataError("emission rows must be probability vectors")
        if transition.min() < 0 or transition.max() >= Q:
            raise DataError("transition entries must be state ids in [0, Q)")
        if len(words) != V or len(set(words)) != V:
            raise DataError(f"need {V} distinct words, got {len(set(words))}")
        if not 0 <= start_state < Q:
            raise DataError(f"start_state {start_state} out of range [0, {Q})")
        self.emission = emission
        self.transition = transition
        self.start_state = int(start_state)
        self.seq_len = int(seq_len)
        self.words = list(words)
        self.config = config
        self._log_e = torch.from_numpy(np.log(np.maximum(emission, 1e-300)))
        self._delta = torch.from_numpy(transition)

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    @property
    def num_states(self) -> int:
        return self.emission.shape[0]

    # ------------------------------------------------------------------ construction
    @staticmethod
    def generate(config: LanguageConfig = LanguageConfig()) -> SyntheticLanguage:
        """Draw a language from ``config`` (pure function of the config, including its seed)."""
        rng = np.random.default_rng(config.seed)
        V, Q, b = config.vocab_size, config.num_states, config.branching
        for _ in range(1000):
            token_class = rng.permutation(np.arange(V) % Q)
            emission = np.full((Q, V), config.smoothing / V)
            for s in range(Q):
                support = rng.choice(V, size=b, replace=False)
                weights = rng.dirichlet(np.full(b, config.concentration))
                emission[s, support] += (1.0 - config.smoothing) * weights
            emission /= emission.sum(1, keepdims=True)
            transition = np.tile(token_class, (Q, 1))
            if _strongly_connected(emission > config.smoothing / V * 1.5, transition):
                break
        else:  # pragma: no cover - practically unreachable for sane configs
            raise ConfigError("could not draw a connected language; raise branching")
        return SyntheticLanguage(
            emission, transition, int(rng.integers(Q)), config.seq_len, _words(V), config
        )

    # ------------------------------------------------------------------ exact quantities
    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats for (B, L) token ids; float64 (B,)."""
        x = torch.as_tensor(x).long().cpu()
        if x.dim() != 2:
            raise DataError(f"expected (B, L) token ids, got shape {tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() >= self.vocab_size):
            raise DataError(
                f"token ids must lie in [0, {self.vocab_size}); got [{x.min()}, {x.max()}]"
            )
        s = torch.full((x.shape[0],), self.start_state, dtype=torch.long)
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for t in range(x.shape[1]):
            total += self._log_e[s, x[:, t]]
            s = self._delta[s, x[:, t]]
        return total

    def log_marginal(self, x: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """Exact log p(x_visible) in nats for (B, L) partially masked states; float64 (B,).

        The masked positions are summed out (forward algorithm over the hidden states):

            α_1 = 1[start],   α_{t+1}(s') = Σ_s α_t(s) Σ_x E[s, x] 1[δ(s, x) = s'] · m_t(x),

        m_t(x) = 1 at a masked position, 1[x = x_t] at a visible one; log p(x_vis) = log Σ α_{L+1}.
        A state with no visible token has log-probability 0; a fully visible one gets
        :meth:`log_likelihood`.
        """
        x = torch.as_tensor(x).long().cpu()
        B, L = x.shape
        E = torch.from_numpy(self.emission)
        Q = self.num_states
        step = torch.from_numpy(self._step_matrix())
        alpha = torch.zeros(B, Q, dtype=torch.float64)
        alpha[:, self.start_state] = 1.0
        total = torch.zeros(B, dtype=torch.float64)
        for t in range(L):
            xt = x[:, t]
            visible = xt != mask_token_id
            xv = xt.clamp(0, self.vocab_size - 1)
            moved = alpha @ step
            seen = torch.zeros_like(alpha).scatter_add_(1, self._delta[:, xv].T, alpha * E[:, xv].T)
            alpha = torch.where(visible[:, None], seen, moved)
            z = alpha.sum(1)
            total += torch.log(z)
            alpha = alpha / z[:, None]
        return total

    def posterior_logits(self, x: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """Exact log p(x_i = v | x_visible) for every position: (B, L, V) float64.

        Forward-backward over the hidden states with the masked positions summed out:

            p(x_i = v | x_vis) ∝ Σ_s α_i(s) · E[s, v] · β_{i+1}(δ(s, v)),

        α_i(s) = P(S_i = s, x_vis before i), β_i(s) = P(x_vis from i on | S_i = s). At a visible
        position this is the language's conditional given everything else visible. The
        perfect denoiser of the mask path (``ExactDenoiser``), for reference samplers.
        """
        x = torch.as_tensor(x).long().cpu()
        B, L = x.shape
        Q, V = self.num_states, self.vocab_size
        E = torch.from_numpy(self.emission)
        step = torch.from_numpy(self._step_matrix())
        visible = x != mask_token_id
        xv = x.clamp(0, V - 1)
        alphas = torch.empty(L, B, Q, dtype=torch.float64)
        alpha = torch.zeros(B, Q, dtype=torch.float64)
        alpha[:, self.start_state] = 1.0
        for t in range(L):
            alphas[t] = alpha
            seen = torch.zeros_like(alpha).scatter_add_(
                1, self._delta[:, xv[:, t]].T, alpha * E[:, xv[:, t]].T
            )
            alpha = torch.where(visible[:, t, None], seen, alpha @ step)
            alpha = alpha / alpha.sum(1, keepdim=True)
        out = torch.empty(B, L, V, dtype=torch.float64)
        beta = torch.ones(B, Q, dtype=torch.float64)
        if bool((self._delta == self._delta[0]).all()):  # δ(s, v) = δ(v): a Markov chain in
            nxt = self._delta[0]  # the tokens, (B, V) work per position instead of (B, Q, V)
            for t in reversed(range(L)):
                ahead = beta[:, nxt]  # β_{t+1}(δ(v)), (B, V)
                pv = (alphas[t] @ E) * ahead
                out[:, t] = torch.log(pv / pv.sum(1, keepdim=True))
                m = ahead.clone()
                vis = visible[:, t]
                if vis.any():
                    keep = torch.nn.functional.one_hot(xv[vis, t], V).bool()
                    m[vis] = torch.where(keep, m[vis], 0.0)
                beta = m @ E.T
                beta = beta / beta.sum(1, keepdim=True)
            return out
        delta = self._delta.reshape(-1)
        for t in reversed(range(L)):
            ahead = beta[:, delta].view(B, Q, V)  # β_{t+1}(δ(s, v))
            joint = alphas[t][:, :, None] * E[None] * ahead  # (B, Q, V)
            pv = joint.sum(1)
            out[:, t] = torch.log(pv / pv.sum(1, keepdim=True))
            m = torch.where(
                visible[:, t, None], torch.nn.functional.one_hot(xv[:, t], V).double(), 1.0
            )
            beta = (E[None] * ahead * m[:, None, :]).sum(-1)
            beta = beta / beta.sum(1, keepdim=True)
        return out

    def _step_matrix(self) -> np.ndarray:
        """(Q, Q): P(S_{t+1} = s' | S_t = s) = Σ_x E[s, x] 1[δ(s, x) = s']."""
        Q = self.num_states
        step = np.zeros((Q, Q))
        for s in range(Q):
            np.add.at(step[s], self.transition[s], self.emission[s])
        return step

    def state_marginals(self, length: int | None = None) -> np.ndarray:
        """(L, Q) float64: P(S_t = s) for t = 1..L."""
        L = self.seq_len if length is None else length
        Q = self.num_states
        step = self._step_matrix()
        out = np.zeros((L, Q))
        p = np.zeros(Q)
        p[self.start_state] = 1.0
        for t in range(L):
            out[t] = p
            p = p @ step
        return out

    def entropy_per_token(self, length: int | None = None) -> float:
        """Exact H(X_{1:L}) / L in nats."""
        e = self.emission
        h_state = -(e * np.log(np.maximum(e, 1e-300))).sum(1)
        marg = self.state_marginals(length)
        return float((marg @ h_state).sum() / marg.shape[0])

    def perplexity(self, length: int | None = None) -> float:
        """exp(H(X_{1:L}) / L): the best generative perplexity any model can have on average."""
        return math.exp(self.entropy_per_token(length))

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n sequences (n, L) int64, drawn with float64 inverse-CDF sampling."""
        cdf = torch.from_numpy(np.cumsum(self.emission, axis=1))
        s = torch.full((n,), self.start_state, dtype=torch.long)
        out = torch.empty((n, self.seq_len), dtype=torch.long)
        for t in range(self.seq_len):
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            c = cdf[s]
            x = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1), right=True).squeeze(1)
            x.clamp_(max=self.vocab_size - 1)
            out[:, t] = x
            s = self._delta[s, x]
        return out

    # ------------------------------------------------------------------ text
    def decode(self, x: torch.Tensor | list[int], mask_token_id: int | None = None) -> str:
        """Token ids → space-separated words ([MASK] shown as ``_``)."""
        ids = x.tolist() if isinstance(x, torch.Tensor) else list(x)
        return " ".join("_" if i == mask_token_id else self.words[i] for i in ids)

    def tokenizer(self, with_mask: bool = True):
        """A `tokenizers` WordLevel tokenizer over the words (+ [MASK] as id V)."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {w: i for i, w in enumerate(self.words)}
        if with_mask:
            vocab[MASK_TOKEN] = self.vocab_size
        unk = MASK_TOKEN if with_mask else self.words[0]
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        if with_mask:
            tok.add_special_tokens([MASK_TOKEN])
        return tok

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "format": LANGUAGE_FORMAT,
            "format_version": LANGUAGE_VERSION,
            "description": (
                "Unifilar HMM. p(x) = prod_t emission[s_t][x_t], s_1 = start_state, "
                "s_{t+1} = transition[s_t][x_t]; every sequence has length seq_len."
            ),
            "config": asdict(self.config) if self.config else None,
            "vocab_size": self.vocab_size,
            "num_states": self.num_states,
            "seq_len": self.seq_len,
            "start_state": self.start_state,
            "words": self.words,
            "emission": self.emission.tolist(),
            "transition": self.transition.tolist(),
            "entropy_per_token": self.entropy_per_token(),
        }

    @staticmethod
    def from_dict(d: dict) -> SyntheticLanguage:
        if d.get("format") != LANGUAGE_FORMAT:
            raise DataError(
                f"not a synthetic language file (format={d.get('format')!r}, "
                f"expected {LANGUAGE_FORMAT!r})"
            )
        cfg = LanguageConfig(**d["config"]) if d.get("config") else None
        return SyntheticLanguage(
            np.asarray(d["emission"]),
            np.asarray(d["transition"]),
            d["start_state"],
            d["seq_len"],
            d["words"],
            cfg,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @staticmethod
    def load(path: str | Path) -> SyntheticLanguage:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"language file {p} does not exist")
        try:
            return SyntheticLanguage.from_dict(json.loads(p.read_text()))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"language file {p} is malformed ({e}); regenerate it") from None


def _strongly_connected(support: np.ndarray, transition: np.ndarray) -> bool:
    """Is the state graph s → δ(s, x) for x in the sparse support strongly connected?"""
    Q = support.shape[0]
    adj = [set(transition[s, support[s]].tolist()) for s in range(Q)]
    radj: list[set[int]] = [set() for _ in range(Q)]
    for s in range(Q):
        for t in adj[s]:
            radj[t].add(s)

    def reach(graph: list[set[int]]) -> int:
        seen, todo = {0}, [0]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return len(seen)

    return reach(adj) == Q and reach(radj) == Q


class ExactDenoiser:
    """The perfect mask-path denoiser of a synthetic language: logits of the exact posterior
    p(x_1 | x_t) (:meth:`SyntheticLanguage.posterior_logits`). Time-invariant, like every
    mask-source posterior. A reference sampler: what any teacher sampled the same way could
    reach at best.
    """

    time_invariant = True

    def __init__(self, language: SyntheticLanguage, mask_token_id: int):
        self.language = language
        self.mask_token_id = int(mask_token_id)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x_t: (B, L) int64 → (B, L, V) float32 logits on x_t's device."""
        logits = self.language.posterior_logits(x_t, self.mask_token_id)
        return logits.float().to(x_t.device)
