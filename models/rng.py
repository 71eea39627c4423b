"""Counter-based randomness: a random number is a pure function of (seed, step, stream, position).

A trajectory's randomness therefore does not depend on which other trajectories share its batch,
on how many candidates are rolled out beside it, or on which worker runs it. No global RNG is
ever touched.

Each uniform is built from a 32-bit integer hash (Wellons' "lowbias32", evaluated in int64 so
that every intermediate stays below 2^63) applied to a key that chains seed, step, stream and
position; two independent hashes give the 53 bits of a float64 in [0, 1).
"""

from __future__ import annotations

import enum

import torch

_M32 = 0xFFFFFFFF


class Stream(enum.IntEnum):
    """Independent streams of randomness for one trajectory."""

    SOURCE = 1  # x_0 for the uniform source
    JUMP = 2  # does position i jump in this step?
    DRAW = 3  # which token x̂ ~ p(x_1 | x_t) it jumps to
    SELECT = 4  # softmax selection among candidates


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for 0 ≤ x, c < 2^32, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _mix(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return hash32(key ^ hash32(torch.as_tensor(value, device=key.device) + 0x9E3779B9))


SEED_STRIDE = 2**32  # trajectories per seed: seed s owns the seeds [s · 2^32, (s + 1) · 2^32)


def trajectory_seed(seed: int, i: int | torch.Tensor) -> int | torch.Tensor:
    """The seed of trajectory (or sample) ``i`` under the run seed ``seed``: seed · 2^32 + i.

    Used by every producer of trajectories (dataset build, verify's replay, evaluation
    samples, compass negatives), so that the same (seed, i) means the same randomness.

    Args:
        seed: run seed, 0 ≤ seed < 2^30 (so that the result stays below 2^63).
        i: trajectory index, 0 ≤ i < 2^32: an int, or an int64 tensor / array of them.
    """
    return seed * SEED_STRIDE + i


class CounterRNG:
    """Per-row counter-based uniforms for a batch of trajectories.

    Args:
        seeds: (B,) int64 seeds, one per trajectory (row).
        lane: an extra key that separates independent copies of the same trajectory, e.g. the
            K candidates of a midpoint search (lane 0 is the trajectory's own stream).
        shared: streams drawn from lane 0 whatever the row's lane, so that copies of one
            trajectory share them (e.g. ``(Stream.JUMP,)``: every candidate reveals the same
            positions and only the token draws differ).
    """

    def __init__(
        self,
        seeds: torch.Tensor,
        lane: torch.Tensor | int = 0,
        shared: tuple[Stream, ...] = (),
    ):
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        assert seeds.dim() == 1, "seeds must be a 1-D tensor"
        self.seeds = seeds
        lane = torch.as_tensor(lane, dtype=torch.long, device=seeds.device)
        self.lane = lane.expand_as(seeds) if lane.dim() == 0 else lane
        self.shared = tuple(Stream(s) for s in shared)
        lo = seeds & _M32
        hi = (seeds >> 32) & _M32
        base = _mix(hash32(lo), hi)
        self._key = _mix(base, self.lane)
        self._key0 = _mix(base, torch.zeros_like(self.lane)) if self.shared else self._key

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def __len__(self) -> int:
        return self.seeds.numel()

    def index(self, rows: torch.Tensor) -> CounterRNG:
        """The RNG of a subset of rows (same streams, so results do not depend on batching)."""
        return CounterRNG(self.seeds[rows], self.lane[rows], self.shared)

    def with_lanes(self, lanes: torch.Tensor) -> CounterRNG:
        return CounterRNG(self.seeds, lanes, self.shared)

    def to(self, device: torch.device | str) -> CounterRNG:
        return CounterRNG(self.seeds.to(device), self.lane.to(device), self.shared)

    def uniform(self, step: int, stream: Stream, n: int) -> torch.Tensor:
        """(B, n) float64 uniforms in [0, 1) for counter (step, stream, position 0..n−1)."""
        base = self._key0 if stream in self.shared else self._key
        key = _mix(_mix(base, int(step) & _M32), int(stream))
        pos = torch.arange(n, device=self.device, dtype=torch.long)
        a = hash32(key.unsqueeze(1) ^ hash32(pos * 2 + 0x632BE5AB))
        b = hash32(key.unsqueeze(1) ^ hash32(pos * 2 + 1 + 0x632BE5AB))
        bits = ((a >> 5) << 26) | (b >> 6)  # 27 + 26 = 53 bits
        return bits.to(torch.float64) * (1.0 / 9007199254740992.0)


def categorical(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF categorical draw in float64.

    Args:
        cdf: (..., V) float64 cumulative sums of probabilities along the last axis.
        u: (...) float64 uniforms in [0, 1).

    Returns:
        (...) int64 indices j with cdf[j−1] ≤ u·cdf[V−1] < cdf[j]; a token of zero probability
        is never returned.
    """
    assert cdf.dtype == torch.float64 and u.dtype == torch.float64
    total = cdf[..., -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
