"""A bidirectional transformer over tokens, conditioned on time t (and optionally step size h).

Positions enter through rotary embeddings in attention (relative offsets matter most for the
local dependencies of language), conditioning through adaptive layer norm.

Conditioning follows DiT's adaptive layer norm with zero-initialised gates (adaLN-Zero):

    c = MLP(sin_emb(t)) [+ MLP(sin_emb(h))]        (a learned constant when unconditioned)
    (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c))
    z ← z + α₁ · Attn(LN(z) · (1 + γ₁) + β₁)
    z ← z + α₂ · MLP(LN(z) · (1 + γ₂) + β₂)

The step-size branch (FS-DFM) is zero-initialised at its output, so a student built from a
teacher's weights starts out computing exactly the teacher's function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from tsdfm.models.errors import ConfigError


@dataclass(frozen=True)
class BackboneConfig:
    """Size and conditioning of the transformer.

    Args:
        vocab_in: input vocabulary (data tokens plus [MASK] when the source is mask).
        vocab_out: output vocabulary (data tokens).
        max_len: longest sequence (rotary position embeddings are tabulated up to it).
        d_model, n_layers, n_heads, mlp_ratio: transformer size.
        cond_dim: width of the conditioning vector c.
        time_conditioning: condition on t.
        step_conditioning: condition on the step size h (students).
        dropout: dropout inside blocks during training.
        head: "tokens" (logits per position) or "scalar" (one value per sequence, compass).
    """

    vocab_in: int
    vocab_out: int
    max_len: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    cond_dim: int = 128
    time_conditioning: bool = True
    step_conditioning: bool = False
    dropout: float = 0.0
    head: str = "tokens"

    def __post_init__(self) -> None:
        for name in (
            "vocab_in",
            "vocab_out",
            "max_len",
            "d_model",
            "n_layers",
            "n_heads",
            "mlp_ratio",
            "cond_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"backbone {name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"backbone d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"backbone head size d_model/n_heads={self.d_model // self.n_heads} must be even "
                "(rotary embeddings rotate pairs of features)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"backbone dropout={self.dropout} must be in [0, 1)")
        if self.head not in ("tokens", "scalar"):
            raise ConfigError(f"backbone head={self.head!r}; use 'tokens' or 'scalar'")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> BackboneConfig:
        known = {f.name for f in fields(BackboneConfig)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown backbone config keys {sorted(unknown)}")
        return BackboneConfig(**d)


def sinusoidal_embedding(x: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) values in [0, 1] → (B, dim) sin/cos features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half
    )
    args = (x.float() * scale).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ScalarEmbedding(nn.Module):
    """sin_emb(s) → MLP → (B, cond_dim)."""

    def __init__(self, cond_dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(s, self.freq_dim))


def rotary_tables(length: int, head_dim: int, base: float = 10000.0):
    """cos/sin tables (L, head_dim/2) of rotary position embeddings."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32).unsqueeze(1) * inv.unsqueeze(0)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (x_a, x_b) of (B, H, L, D) by position-dependent angles."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def _modulate(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * d, d),
        )
        self.ada = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.dropout = cfg.dropout

    def forward(
        self, z: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        B, L, d = z.shape
        b1, g1, a1, b2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=1)
        qkv = self.qkv(_modulate(self.norm1(z), b1, g1))
        q, k, v = qkv.view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        att = att.transpose(1, 2).reshape(B, L, d)
        z = z + a1.unsqueeze(1) * F.dropout(self.proj(att), p, self.training)
        m = self.mlp(_modulate(self.norm2(z), b2, g2))
        return z + a2.unsqueeze(1) * F.dropout(m, p, self.training)


class Backbone(nn.Module):
    """Token transformer: (x (B, L) int64, t (B,), h (B,)) → logits (B, L, V) or energies (B,)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_in, d)
        nn.init.normal_(self.tok.weight, std=0.02)
        cos, sin = rotary_tables(cfg.max_len, d // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.time_emb = ScalarEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.step_emb = ScalarEmbedding(cfg.cond_dim) if cfg.step_conditioning else None
        if self.step_emb is not None:
            nn.init.zeros_(self.step_emb.mlp[-1].weight)
            nn.init.zeros_(self.step_emb.mlp[-1].bias)
        self.cond_const = nn.Parameter(torch.zeros(1, cfg.cond_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_ada = nn.Linear(cfg.cond_dim, 2 * d)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)
        out = cfg.vocab_out if cfg.head == "tokens" else 1
        self.out = nn.Linear(d, out)

    def condition(self, t: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        c = self.cond_const.expand(t.shape[0], -1)
        if self.time_emb is not None:
            c = c + self.time_emb(t)
        if self.step_emb is not None:
            assert h is not None, "a step-conditioned backbone needs the step size h"
            c = c + self.step_emb(h)
        return c

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        L = x.shape[1]
        assert self.cfg.max_len >= L, f"sequence length {L} exceeds max_len {self.cfg.max_len}"
        c = self.condition(t, h)
        z = self.tok(x)
        rope = (self.rope_cos[:L], self.rope_sin[:L])
        for block in self.blocks:
            z = block(z, c, rope)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=1)
        z = _modulate(self.final_norm(z), shift, scale)
        if self.cfg.head == "scalar":
            return self.out(z.mean(dim=1)).squeeze(-1)
        return self.out(z)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
