"""The finite-step jump rule and the samplers built on it.

Jump rule from t to t+h, per position i, given the denoiser's p_1t = p(x_1 | x_t):

    x̂^i ~ p_1t^i                                   (float64 inverse-CDF draw)
    x_{t+h}^i = x̂^i   with probability  q(t, h) = (κ(t+h) − κ(t)) / (1 − κ(t))
    x_{t+h}^i = x_t^i otherwise

q is the exact probability that a position still at its source value at time t has switched to
its data value by time t+h under the mixture path, so a finite step never overshoots; at
t+h = 1 it equals 1 and every position takes x̂. Under the mask source only masked positions
move (a revealed token is final); under the uniform source every position may move.

The teacher sampler is the rollout over the uniform grid of N steps; the step-size-aware
(student) sampler is the same rollout over a grid of S steps, the denoiser receiving h as well.

Temperature T reshapes every draw: x̂ ~ softmax(logits / T) ∝ (p_1t)^{1/T} in place of p_1t
(:class:`TemperedDenoiser`); T < 1 sharpens the draws (lower entropy), T > 1 flattens them,
and T = 1 is the model itself, bit for bit. The jump probabilities q(t, h) do not change.

Masked-source denoisers that are time-invariant (p(x_1 | x_t) does not depend on t under the
mask path) are only re-evaluated for rows whose state changed since their last evaluation;
this is exact, not an approximation, and makes N ≫ L steps cost about L forward passes.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.path import MixturePath
from tsdfm.models.rng import CounterRNG, Stream, categorical


class Denoiser(Protocol):
    """Anything that maps (x_t, t, h) to logits of p(x_1 | x_t) over the data vocabulary."""

    time_invariant: bool

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x_t: (B, L) int64; t, h: (B,) float32 → (B, L, V) logits."""
        ...


class TemperedDenoiser:
    """A denoiser whose p(x_1 | x_t) is sharpened (T < 1) or flattened (T > 1):

        logits_T(x_t, t, h) = logits(x_t, t, h) / T,   softmax(logits_T) ∝ (p_1t)^{1/T}

    Args:
        model: the denoiser; its ``time_invariant`` carries over (dividing by a constant keeps
            p(x_1 | x_t) independent of t), so the sampler's cache works through the wrapper.
        temperature: T > 0; T = 1 returns the model's logits unchanged (the same tensor).
    """

    def __init__(self, model: Denoiser, temperature: float):
        self.model = model
        self.temperature = check_temperature(temperature)
        self.time_invariant = model.time_invariant

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x_t: (B, L) int64; t, h: (B,) float32 → (B, L, V) logits / T."""
        logits = self.model(x_t, t, h)
        return logits if self.temperature == 1.0 else logits / self.temperature


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """T as a float, or a ConfigError saying what a valid T is."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{name}={temperature!r} must be a finite number > 0: 1 samples the model as it is, "
            "< 1 sharpens its draws, > 1 flattens them"
        )
    return value


def tempered(model: Denoiser, temperature: float) -> Denoiser:
    """``model`` itself at T = 1 (so T = 1 is today's sampler exactly), else the wrapper."""
    return model if check_temperature(temperature) == 1.0 else TemperedDenoiser(model, temperature)


def uniform_grid(n_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """t_j = j / n for j = 0..n, float64, shape (n+1,)."""
    assert n_steps >= 1
    return torch.arange(n_steps + 1, dtype=torch.float64, device=device) / n_steps


def jump_probability(path: MixturePath, t: float, h: float) -> float:
    """q(t, h) = (κ(t+h) − κ(t)) / (1 − κ(t)); exactly 1 when t + h reaches 1."""
    k_t = float(path.scheduler.kappa(t))
    if t + h >= 1.0 - 1e-12:
        return 1.0
    k_next = float(path.scheduler.kappa(t + h))
    return min(1.0, max(0.0, (k_next - k_t) / (1.0 - k_t)))


REVEAL_ORDERS = ("random", "dilated")


def dilated_ranks(seq_len: int) -> torch.Tensor:
    """rank[i] of position i in the dilated order: positions sorted by the base-2 radical inverse
    of their index (van der Corput), so that for L = 64 the first 8 ranks are the positions
    0, 32, 16, 48, 8, 40, 24, 56 (every 8th), the next 8 are 4 mod 8, then 2, 6, 1, 5, 3, 7 mod 8.
    Any prefix of the order is spread as evenly over the sequence as it can be. (L,) int64."""
    bits = max(1, (seq_len - 1).bit_length())
    key = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(seq_len)]
    order = sorted(range(seq_len), key=lambda i: key[i])
    rank = torch.empty(seq_len, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(seq_len)
    return rank


@functools.lru_cache(maxsize=64)
def _segments(bounds: tuple[int, ...], seq_len: int) -> torch.Tensor:
    """(L,) segment of each position: the ranks [bounds[k], bounds[k+1]) of
    :func:`dilated_ranks` form segment k (cached: the sampler asks at every step)."""
    rank = dilated_ranks(seq_len)
    seg = torch.zeros(seq_len, dtype=torch.long)
    for k in range(len(bounds) - 1):
        seg[(rank >= bounds[k]) & (rank < bounds[k + 1])] = k
    return seg


@dataclass(frozen=True)
class RevealPlan:
    """Which masked positions may move in a step, and with what probability.

    ``random`` is the mixture path's own rule: every masked position moves with
    q(t, h) = (κ(t+h) − κ(t)) / (1 − κ(t)), independently, so the positions revealed together
    in a coarse step are a random subset (adjacent ones included).

    ``dilated`` fixes *where* each segment of the grid t_k = k / S reveals and keeps *how many*
    as the path says: positions are ranked by :func:`dilated_ranks` and segment k reveals the
    ranks [c_k, c_{k+1}) with c_k = round(L · κ(t_k)). Within a segment each of its positions
    moves with probability h / (t_{k+1} − t) (1 at the segment's last step), i.e. at a uniform
    time inside the segment; so an S-step sampler reveals exactly its group at step k, and an
    N-step teacher rolled over the same S segments reveals the same groups one token at a time.
    With L = 64 and S = 8, step k reveals every 8th position: tokens drawn together are never
    neighbours, and from step 2 on each lies between tokens already known, which is where a
    per-position (factorised) step loses least. Mask source only.

    Args:
        order: "random" or "dilated".
        segments: S, the segments of the dilated grid (ignored by ``random``).
    """

    order: str = "random"
    segments: int = 8

    def __post_init__(self) -> None:
        if self.order not in REVEAL_ORDERS:
            raise ConfigError(
                f"unknown reveal order {self.order!r}; use one of {', '.join(REVEAL_ORDERS)}"
            )
        if self.segments < 1:
            raise ConfigError(f"reveal segments={self.segments} must be a positive integer")

    def check(self, path: MixturePath) -> None:
        if self.order == "dilated" and path.source != "mask":
            raise ConfigError(
                "the dilated reveal order needs the mask source (every position of a uniform "
                "source may move at every step); use --order random"
            )

    def segment_of(self, path: MixturePath, seq_len: int, device=None) -> torch.Tensor:
        """(L,) int64: the segment k in which each position is revealed (dilated order)."""
        S = self.segments
        c = [round(seq_len * float(path.scheduler.kappa(k / S))) for k in range(S + 1)]
        c[-1] = seq_len
        seg = _segments(tuple(c), seq_len)
        return seg.to(device if device is not None else "cpu", copy=True)

    def move_probability(
        self, path: MixturePath, t: float, h: float, seq_len: int, device=None
    ) -> float | torch.Tensor:
        """q of a step from t to t + h: a float (random order) or an (L,) float64 tensor."""
        if self.order == "random":
            return jump_probability(path, t, h)
        S = self.segments
        k = min(S - 1, int(t * S + 1e-9))
        end = (k + 1) / S
        q = 1.0 if t + h >= end - 1e-9 else h / (end - t)
        seg = self.segment_of(path, seq_len, device)
        return torch.where(seg == k, q, 0.0).to(torch.float64)

    def to_dict(self) -> dict:
        return {"order": self.order, "segments": self.segments}


def jump_step(
    x_t: torch.Tensor,
    logits_1t: torch.Tensor,
    q: float | torch.Tensor,
    rng: CounterRNG,
    step: int,
    mask_token_id: int | None,
) -> torch.Tensor:
    """One finite step of the jump rule (pure: same inputs, same output).

    Args:
        x_t: (B, L) int64 current state.
        logits_1t: (B, L, V) logits of p(x_1 | x_t) (divided by T for tempered sampling, see
            :class:`TemperedDenoiser`); only rows/positions that move are read.
        q: jump probability q(t, h) for this step, or an (L,) tensor of per-position
            probabilities (:class:`RevealPlan`).
        rng: counter-based randomness of the B rows.
        step: global step counter (keys the random streams).
        mask_token_id: id of [MASK] under the mask source, None under the uniform source.

    Returns:
        (B, L) int64 state x_{t+h}.
    """
    L = x_t.shape[1]
    moves = rng.uniform(step, Stream.JUMP, L) < q
    if mask_token_id is not None:
        moves &= x_t == mask_token_id
    rows, cols = moves.nonzero(as_tuple=True)
    x_next = x_t.clone()
    if rows.numel():
        u = rng.uniform(step, Stream.DRAW, L)[rows, cols]
        x_next[rows, cols] = draw_tokens(logits_1t, rows, cols, u)
    return x_next


DRAW_CHUNK_ELEMENTS = 1 << 20  # float64 work per chunk of draws: 8 MiB per temporary


def draw_tokens(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """x̂ ~ softmax(logits[rows, cols]) by the float64 inverse CDF, for M positions.

    The draw of each position is a function of its own logits row and uniform only, so the
    positions go through softmax, cumsum and the search in chunks of at most
    ``DRAW_CHUNK_ELEMENTS`` float64 values: the same draws as one pass over all M × V values,
    with temporaries of 8 MiB instead of M × V × 8 bytes each (3.3 GiB for M = 8,192 moving
    positions of a 50,257-token vocabulary), which stay in reusable memory.

    Args:
        logits: (B, L, V) logits.
        rows, cols: (M,) int64 positions that draw.
        u: (M,) float64 uniforms in [0, 1).

    Returns:
        (M,) int64 tokens.
    """
    out = torch.empty(rows.shape[0], dtype=torch.long, device=logits.device)
    step = max(1, DRAW_CHUNK_ELEMENTS // logits.shape[-1])
    for a in range(0, rows.shape[0], step):
        b = a + step
        p = torch.softmax(logits[rows[a:b], cols[a:b]].double(), dim=-1)
        out[a:b] = categorical(p.cumsum(-1), u[a:b])
    return out


def token_log_probs(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """log softmax(logits[rows, cols])[tokens] in float64, (M,), in the chunks of
    :func:`draw_tokens` (each position's value depends on its own row only)."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=logits.device)
    step = max(1, DRAW_CHUNK_ELEMENTS // logits.shape[-1])
    for a in range(0, rows.shape[0], step):
        b = a + step
        lp = torch.log_softmax(logits[rows[a:b], cols[a:b]].double(), dim=-1)
        out[a:b] = lp.gather(1, tokens[a:b, None]).squeeze(1)
    return out


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DenoiserCache:
    """Logits of the last evaluation per row, and whether they are still valid for x_t."""

    logits: torch.Tensor | None = None  # (B, L, V) float32
    valid: torch.Tensor | None = None  # (B,) bool

    def select(self, rows: torch.Tensor) -> DenoiserCache:
        if self.logits is None:
            return DenoiserCache()
        return DenoiserCache(self.logits[rows], self.valid[rows])


@dataclass
class Counters:
    """Work done by a rollout: batched forward calls and per-sequence forward passes."""

    forward_calls: int = 0
    row_forwards: int = 0
    steps: int = 0
    forward_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        self.forward_calls += other.forward_calls
        self.row_forwards += other.row_forwards
        self.steps += other.steps
        self.forward_seconds += other.forward_seconds


def _evaluate(
    model: Denoiser,
    x: torch.Tensor,
    t: float,
    h: float,
    cache: DenoiserCache,
    counters: Counters,
    in_place: bool = False,
) -> DenoiserCache:
    """The cache for x: the rows that need it re-evaluated, in one forward pass.

    ``in_place``: the caller owns ``cache.logits`` (the rollout allocated it), so the new rows
    are written into it; otherwise the cache is copied first (a caller may hold it).
    The forward's seconds are counted after the device has finished it (CUDA runs
    asynchronously), so they are the forward's and not the next step's."""
    B = x.shape[0]
    if model.time_invariant and cache.logits is not None:
        need = ~cache.valid
    else:
        need = torch.ones(B, dtype=torch.bool, device=x.device)
    rows = need.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return cache
    start = time.perf_counter()
    tt = torch.full((rows.numel(),), t, dtype=torch.float32, device=x.device)
    hh = torch.full((rows.numel(),), h, dtype=torch.float32, device=x.device)
    out = model(x[rows], tt, hh).float()
    synchronize(out.device)
    counters.forward_seconds += time.perf_counter() - start
    counters.forward_calls += 1
    counters.row_forwards += rows.numel()
    if rows.numel() == B:
        logits = out
    else:
        logits = cache.logits if in_place else cache.logits.clone()
        logits[rows] = out
    return DenoiserCache(logits, torch.ones(B, dtype=torch.bool, device=x.device))


def rollout(
    model: Denoiser,
    path: MixturePath,
    x: torch.Tensor,
    times: torch.Tensor,
    rng: CounterRNG,
    step_offset: int = 0,
    cache: DenoiserCache | None = None,
    counters: Counters | None = None,
    plan: RevealPlan | None = None,
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DenoiserCache]:
    """Roll a batch from times[0] to times[-1] with the jump rule, one step per grid interval.

    Args:
        model: the denoiser; receives (x_t, t, h) with h the step size of the grid interval.
        path: mixture path (scheduler, source, mask id).
        x: (B, L) states at times[0].
        times: (n+1,) float64 increasing grid.
        rng: counter-based randomness of the B rows.
        step_offset: global index of the first step (keys the random streams, so a trajectory
            rolled in segments equals one rolled in a single call).
        cache: denoiser cache carried over from a previous segment (time-invariant models).
        counters: accumulates forward calls and time.
        plan: where positions may move (:class:`RevealPlan`); None is the random order.
        log_q: optional (B,) float64 accumulator: adds log p(x̂^i | x_t) of every token drawn
            (the proposal probability of the rollout's draws, for density-ratio selection).

    Returns:
        (x at times[-1], cache for the next segment).
    """
    counters = counters if counters is not None else Counters()
    cache = cache if cache is not None else DenoiserCache()
    plan = plan if plan is not None else RevealPlan()
    plan.check(path)
    mask_id = path.mask_token_id if path.source == "mask" else None
    grid = times.tolist()
    owned = None  # the logits this call allocated, updated in place (not the caller's cache)
    for j in range(len(grid) - 1):
        t, h = grid[j], grid[j + 1] - grid[j]
        q = plan.move_probability(path, t, h, x.shape[1], x.device)
        if isinstance(q, torch.Tensor) and mask_id is not None and not q.any():
            counters.steps += 1
            continue  # nothing may move in this step: no forward pass
        given = cache.logits
        in_place = given is not None and given is owned
        cache = _evaluate(model, x, t, h, cache, counters, in_place)
        if cache.logits is not given:
            owned = cache.logits
        x_next = jump_step(x, cache.logits, q, rng, step_offset + j, mask_id)
        if log_q is not None:
            rows, cols = (x_next != x).nonzero(as_tuple=True)
            if rows.numel():
                lp = token_log_probs(cache.logits, rows, cols, x_next[rows, cols])
                log_q.index_add_(0, rows, lp)
        changed = (x_next != x).any(dim=1)
        cache.valid = cache.valid & ~changed
        x = x_next
        counters.steps += 1
    return x, cache


@dataclass(frozen=True)
class SampleResult:
    """Final samples and the work it took.

    Attributes:
        x_1: (B, L) int64 samples at t = 1.
        counters: forward calls, per-sequence forward passes, steps, seconds in forward.
    """

    x_1: torch.Tensor
    counters: Counters


@torch.no_grad()
def sample(
    model: Denoiser,
    path: MixturePath,
    seeds: torch.Tensor,
    seq_len: int,
    n_steps: int,
    times: torch.Tensor | None = None,
    temperature: float = 1.0,
    order: str = "random",
) -> SampleResult:
    """Unconditional samples: x_0 from the source, then ``n_steps`` jump steps to t = 1.

    With a teacher this is the N-step teacher sampler; with a step-size-conditioned student it is
    the S-step sampler (the student sees h = 1/S, or the grid's own intervals if ``times`` is
    given). Every draw is from softmax(logits / T) (:class:`TemperedDenoiser`).

    Args:
        model: denoiser.
        path: mixture path.
        seeds: (B,) int64, one seed per sample.
        seq_len: L.
        n_steps: number of steps (ignored when ``times`` is given).
        times: optional explicit (n+1,) grid from 0 to 1.
        temperature: T > 0 of the draws; T = 1 (the default) is the model itself.
        order: reveal order (:class:`RevealPlan`): "random", or "dilated" with one segment
            per step of the grid.
    """
    model = tempered(model, temperature)
    rng = CounterRNG(seeds)
    grid = uniform_grid(n_steps, seeds.device) if times is None else times
    plan = RevealPlan(order, len(grid) - 1)
    x_0 = path.sample_source((len(seeds), seq_len), rng)
    counters = Counters()
    x_1, _ = rollout(model, path, x_0, grid, rng, 0, None, counters, plan)
    return SampleResult(x_1=x_1, counters=counters)


def noise_like(
    path: MixturePath,
    plan: RevealPlan,
    x_1: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """x_t: real sequences noised to t in the reveal order of ``plan`` (the positives).

    random: x_t ~ p_t(· | x_1) of the mixture path, exactly ``path.sample(x_1, t, generator)``
    (same generator calls). dilated (mask source): position i, in segment k_i of the S-segment
    grid (``plan.segment_of``), is revealed at

        τ_i = (k_i + u_i) / S,   u_i ~ U(0, 1],   x_t^i = x_1^i if τ_i ≤ t else [MASK],

    a uniform time inside its segment, as the dilated teacher reveals it; at a segment end
    t = k / S exactly the segments < k are revealed. t is compared in units of segments, a t
    equal in float32 to a segment end counting as that end (the bank's times are float32).

    Args:
        path: the teacher's mixture path.
        plan: the reveal order and its S segments.
        x_1: (B, L) int64 data tokens.
        t: (B,) times in [0, 1].
        generator: explicit generator on x_1's device.

    Returns:
        (B, L) int64 x_t.
    """
    if plan.order == "random":
        return path.sample(x_1, t, generator).x_t
    plan.check(path)
    B, L = x_1.shape
    S = plan.segments
    seg = plan.segment_of(path, L, x_1.device)
    u = 1.0 - torch.rand((B, L), generator=generator, device=x_1.device, dtype=torch.float64)
    t = t.to(x_1.device)
    ts = t.double() * S
    end = ts.round()
    ts = torch.where(t.float() == (end / S).float(), end, ts)  # a segment end, in float32
    revealed = seg + u <= ts.unsqueeze(1)
    return torch.where(revealed, x_1, torch.full_like(x_1, path.mask_token_id))


@torch.no_grad()
def teacher_states(
    teacher: Denoiser,
    path: MixturePath,
    rng: CounterRNG,
    seq_len: int,
    n_steps: int,
    record_at: torch.Tensor,
    counters: Counters | None = None,
    plan: RevealPlan | None = None,
) -> torch.Tensor:
    """States x_{t_j} of B blind teacher trajectories at per-row grid indices j.

    Each row is one trajectory of the N-step teacher sampler (``tsdfm.models.solver.sample``): x_0
    from the source, then the jump rule over t_j = j / N in the reveal order of ``plan``. The
    batch is rolled in segments between the requested indices (exact: the counter RNG is keyed
    by the global step).

    Args:
        teacher: the denoiser.
        path: its mixture path.
        rng: counter-based randomness of the B trajectories (seeds and lane).
        seq_len: L.
        n_steps: N, teacher steps over [0, 1].
        record_at: (B, R) int64 grid indices in [0, N] at which each row is recorded.
        counters: accumulates the teacher's forward calls.
        plan: the reveal order (:class:`tsdfm.models.solver.RevealPlan`; dilated needs N a multiple
            of its S segments); None is the random order.

    Returns:
        (B, R, L) int64 states; [b, r] is trajectory b at t = record_at[b, r] / N.
    """
    B, R = record_at.shape
    device = rng.device
    record_at = record_at.to(device)
    grid = uniform_grid(n_steps, device)
    x = path.sample_source((B, seq_len), rng)
    out = torch.empty((B, R, seq_len), dtype=torch.long, device=device)
    cur, cache = 0, DenoiserCache()
    for j in torch.unique(record_at).tolist():
        if j > cur:
            x, cache = rollout(teacher, path, x, grid[cur : j + 1], rng, cur, cache, counters, plan)
            cur = j
        rows, cols = (record_at == j).nonzero(as_tuple=True)
        out[rows, cols] = x[rows]
    return out
