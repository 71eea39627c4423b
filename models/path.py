"""The discrete probability path: schedulers κ(t) and the mixture path with mask or uniform source.

Mixture path (per position i, independently):

    x_t^i = x_1^i   with probability κ(t)
    x_t^i = x_0^i   with probability 1 − κ(t)

with κ(0) = 0, κ(1) = 1, κ non-decreasing. The source x_0 is either all-[MASK] (``mask``) or
uniform over the vocabulary (``uniform``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.rng import CounterRNG, Stream

SOURCES = ("mask", "uniform")


@dataclass(frozen=True)
class PolynomialScheduler:
    """κ(t) = t^n, κ̇(t) = n t^(n−1).

    Args:
        n: exponent, > 0. n = 1 is the linear schedule of the TS-DFM/FS-DFM papers.
    """

    n: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.n, (int, float)) and math.isfinite(self.n) and self.n > 0):
            raise ConfigError(
                f"scheduler exponent n={self.n!r} is invalid; use a positive number (n=1 is linear)"
            )

    def kappa(self, t: torch.Tensor | float) -> torch.Tensor | float:
        return t**self.n

    def d_kappa(self, t: torch.Tensor | float) -> torch.Tensor | float:
        return self.n * t ** (self.n - 1)

    def to_dict(self) -> dict:
        return {"name": "polynomial", "n": float(self.n)}

    @staticmethod
    def from_dict(d: dict) -> PolynomialScheduler:
        name = d.get("name", "polynomial")
        if name != "polynomial":
            raise ConfigError(
                f"unknown scheduler {name!r}; the supported scheduler is 'polynomial' (κ(t)=t^n)"
            )
        return PolynomialScheduler(n=float(d.get("n", 1.0)))


def parse_scheduler(spec: str | dict | PolynomialScheduler) -> PolynomialScheduler:
    """Build a scheduler from ``"polynomial"``, ``"polynomial:2"``, ``"linear"`` or a dict."""
    if isinstance(spec, PolynomialScheduler):
        return spec
    if isinstance(spec, dict):
        return PolynomialScheduler.from_dict(spec)
    name, _, arg = str(spec).partition(":")
    if name == "linear" and not arg:
        return PolynomialScheduler(1.0)
    if name == "polynomial":
        try:
            return PolynomialScheduler(float(arg) if arg else 1.0)
        except ValueError:
            raise ConfigError(
                f"scheduler {spec!r} has a non-numeric exponent; write e.g. 'polynomial:2'"
            ) from None
    raise ConfigError(f"unknown scheduler {spec!r}; use 'linear' or 'polynomial:N' (κ(t)=t^N)")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    return source


@dataclass(frozen=True)
class PathSample:
    """A draw from the path: x_t together with where it came from.

    Attributes:
        x_0: (B, L) source sample.
        x_1: (B, L) data sample.
        x_t: (B, L) path sample at time t.
        t: (B,) times.
    """

    x_0: torch.Tensor
    x_1: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class MixturePath:
    """The mixture probability path with a mask or uniform source.

    Args:
        scheduler: κ(t).
        source: ``"mask"`` (x_0 = [MASK] everywhere) or ``"uniform"`` (x_0 ~ U(vocab)).
        vocab_size: number of data tokens V; token ids are 0..V−1.
        mask_token_id: id of [MASK] (required for the mask source, usually V).
    """

    scheduler: PolynomialScheduler
    source: str
    vocab_size: int
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        check_source(self.source)
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size={self.vocab_size} must be at least 1")
        if self.source == "mask" and self.mask_token_id is None:
            raise ConfigError("the mask source needs a mask_token_id; set special_tokens.mask")

    def sample_source(self, shape: tuple[int, int], rng: CounterRNG, step: int = 0) -> torch.Tensor:
        """x_0 of the given (B, L) shape; B must equal the number of seeds in ``rng``."""
        if self.source == "mask":
            return torch.full(shape, self.mask_token_id, dtype=torch.long, device=rng.device)
        u = rng.uniform(step, Stream.SOURCE, shape[1])
        return (u * self.vocab_size).long().clamp_(max=self.vocab_size - 1)

    def sample(self, x_1: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> PathSample:
        """Draw x_t ~ p_t(· | x_1) for a batch (training-time; uses a torch.Generator).

        Args:
            x_1: (B, L) data tokens.
            t: (B,) times in [0, 1].
            generator: explicit generator on x_1's device.
        """
        B, L = x_1.shape
        if self.source == "mask":
            x_0 = torch.full_like(x_1, self.mask_token_id)
        else:
            x_0 = torch.randint(0, self.vocab_size, (B, L), generator=generator, device=x_1.device)
        kappa = self.scheduler.kappa(t.double()).unsqueeze(1)
        keep = torch.rand((B, L), generator=generator, device=x_1.device, dtype=torch.float64)
        x_t = torch.where(keep < kappa, x_1, x_0)
        return PathSample(x_0=x_0, x_1=x_1, x_t=x_t, t=t)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "scheduler": self.scheduler.to_dict(),
            "vocab_size": self.vocab_size,
            "mask_token_id": self.mask_token_id,
        }
