"""Energy-guided midpoint search: the trajectory-shaping step of TS-DFM (pure torch, no Ray).

Grid t_k = k / S for k = 0..S (S student steps); the teacher runs n = N / S jump steps per
segment. For a batch of trajectories with state x at t_k:

    if t_k ≥ τ and K > 1:                                    (a shaped segment)
        X_j = rollout of x from t_k to t_{k+1} in lane j,  j = 0..K−1   (one batch of B·K rows)
        e_j = E(X_j, t_{k+1})                                 (compass energy, lower = better)
        j*  = argmin_j e_j        or   j* ~ softmax(−e / T)
        x   = X_{j*}
        (token-softmax: x^i = X_{j_i}^i, j_i ~ softmax_j(−e_j^i / T), per position i)
        (tilt, K = 1: x = one teacher step from t_k with logits log q + r(x), no candidates)
    else:                                                     (a blind segment)
        x   = rollout of x from t_k to t_{k+1} in lane 0

E is any ``tsdfm.models.scorer.Scorer``. One shaped segment is :func:`search_segment` (the
compass metrics run the same step); :func:`navigate` only loops over the segments.

Lane j draws its randomness from stream (seed, lane j) with the same global step counters as
the blind trajectory, so lane 0 *is* the blind continuation and K = 1 reproduces the plain
teacher sampler exactly. A trajectory's result does not depend on its batch-mates.

Two options make selection compare like with like. ``shared_reveals``: the lanes share the
reveal randomness (lane 0's JUMP stream), so every candidate reveals the same positions and
only the token draws differ; an energy then cannot prefer a candidate for revealing more or
fewer tokens. ``reveal_order = "dilated"``: every segment reveals a fixed, evenly spread group
of positions (``tsdfm.models.solver.RevealPlan``), the same group the student's S-step sampler
reveals at that step, so the trajectories follow a schedule the student can follow.

Selection by ``softmax`` at temperature 1 with an energy E = log q − log p (a density ratio:
an untempered NCE compass, or the exact scorer given the proposal ``log_q``) is importance
resampling: the kept candidate is distributed closer to p (the data) than the teacher's q,
without sharpening it. ``argmin`` keeps the mode of the K candidates (mode-seeking).

``token-softmax`` resamples each position separately, with a per-position energy (the
token-ratio compass's −r(X)[i, x^i]): position i of the kept state takes lane j_i's token. The
kept state then has the per-position marginals a factorised student can learn, whereas a whole
candidate kept by ``softmax`` carries a joint correction that the student's independent
per-position draws lose (issue 13: on the bundled teacher the student kept a third of the
oracle data's gain).

``tilt`` draws no candidates: each shaped segment is one teacher step whose logits are the
teacher's plus the token-ratio compass's log-ratios r(X) at the predecessor X, i.e. the teacher
tilted toward the data, the K → ∞ limit of ``token-softmax`` at temperature 1, for one teacher
pass per segment (K for the others) and two compass passes (the tilt, the recorded energy).
It needs K = 1, one teacher step per segment (N = S: the compass reads the predecessor at t_k)
and the dilated order (the plan the compass was trained on). Its recorded energy is the kept
state's (one value per segment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.path import MixturePath
from tsdfm.models.rng import CounterRNG, Stream, categorical
from tsdfm.models.scorer import Scorer, per_position, uses_proposal
from tsdfm.models.solver import (
    Counters,
    Denoiser,
    DenoiserCache,
    RevealPlan,
    check_temperature,
    rollout,
    synchronize,
    tempered,
    uniform_grid,
)

SELECTIONS = ("argmin", "softmax", "token-softmax", "tilt")


@dataclass(frozen=True)
class NavigatorConfig:
    """Shape of the search.

    Args:
        student_steps: S, segments of the grid.
        teacher_steps: N, jump steps of the teacher over [0, 1]; must be a multiple of S.
        candidates: K rollouts per shaped midpoint; K = 1 is the blind baseline.
        tau: shaping starts at the first segment with t_k ≥ τ.
        selection: "argmin", "softmax" (sample with probabilities ∝ exp(−e / temperature)) or
            "token-softmax" (per position: each position of the segment takes its token from
            lane j with probability ∝ exp(−e_j^i / temperature), e_j^i the scorer's
            per-position energy; needs a per-position scorer, the token-ratio compass, and
            candidates that reveal the same positions: ``shared_reveals`` or the dilated
            order), or "tilt" (no candidates, K = 1: the shaped segments are drawn from the
            teacher's logits plus the scorer's log-ratios, ``log_ratios``; needs N = S and
            the dilated order).
        temperature: softmax *selection* temperature (> 0).
        teacher_temperature: T > 0 of the teacher's own draws, softmax(logits / T)
            (``tsdfm.models.solver.TemperedDenoiser``); 1 is the teacher itself, T < 1 a sharper,
            lower-entropy teacher (a blind K = 1 build at T < 1 is the control arm for
            shaping at matched entropy).
        reveal_order: "random" (the path's own rule) or "dilated": segment k reveals a fixed,
            evenly spread group of positions (``tsdfm.models.solver.RevealPlan``), the group the
            student's S-step sampler will reveal at step k.
        shared_reveals: candidates of one midpoint share the reveal randomness (the JUMP
            stream of lane 0): the same positions move in every lane and only the token
            draws differ, so selection compares like with like; lane 0 stays the blind
            trajectory.
    """

    student_steps: int = 8
    teacher_steps: int = 1024
    candidates: int = 8
    tau: float = 0.0
    selection: str = "argmin"
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    reveal_order: str = "random"
    shared_reveals: bool = False

    def __post_init__(self) -> None:
        S, N, K = self.student_steps, self.teacher_steps, self.candidates
        if S < 1 or N < 1:
            raise ConfigError(f"student_steps={S} and teacher_steps={N} must be positive")
        if N % S:
            raise ConfigError(
                f"teacher_steps={N} is not divisible by student_steps={S}; pick N as a multiple "
                f"of S (e.g. {S * max(1, round(N / S))})"
            )
        if K < 1:
            raise ConfigError(f"candidates K={K} must be at least 1 (K=1 is the blind baseline)")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau={self.tau} must lie in [0, 1]")
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"unknown selection {self.selection!r}; use argmin, softmax, token-softmax or tilt"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be positive")
        T = check_temperature(self.teacher_temperature, "teacher_temperature")
        object.__setattr__(self, "teacher_temperature", T)  # 1 and 1.0: one config, one print
        self.plan()  # validates reveal_order
        if not isinstance(self.shared_reveals, bool):
            raise ConfigError(f"shared_reveals={self.shared_reveals!r} must be true or false")
        if self.selection == "token-softmax" and not (
            self.shared_reveals or self.reveal_order == "dilated"
        ):
            raise ConfigError(
                "selection token-softmax mixes the candidates position by position, so they must "
                "reveal the same positions; add --shared-reveals or --reveal-order dilated"
            )

        if self.selection == "tilt":
            if K != 1:
                raise ConfigError(
                    f"selection tilt draws no candidates (the tilted teacher is their K → ∞ "
                    f"limit), got K={K}; use K = 1 (--k 1)"
                )
            if N != S or self.reveal_order != "dilated":
                raise ConfigError(
                    "selection tilt reads the token-ratio compass at each segment's predecessor, "
                    f"so it needs one teacher step per segment in the dilated order; use "
                    f"--teacher-steps {S} --reveal-order dilated"
                )

    def plan(self) -> RevealPlan:
        """The reveal plan of every rollout: ``reveal_order`` over the S segments."""
        return RevealPlan(self.reveal_order, self.student_steps)

    @property
    def substeps(self) -> int:
        return self.teacher_steps // self.student_steps

    def shaped_segments(self) -> list[bool]:
        """Which segments k are shaped: t_k ≥ τ, and K > 1 or ``tilt``."""
        S, on = self.student_steps, self.candidates > 1 or self.selection == "tilt"
        return [on and k / S >= self.tau - 1e-12 for k in range(S)]


@dataclass
class NavigationResult:
    """Trajectories of one batch.

    Attributes:
        times: (S+1,) float64 grid.
        states: (B, S+1, L) int64; states[:, 0] is the source sample, states[:, S] the final.
        energies: (B, S, K) float32 candidate energies (zeros in blind segments).
        chosen: (B, S) int64 selected lane (0 in blind segments; under ``token-softmax`` the
            lane that gave most of the positions where the lanes differ).
        kept_energies: (B, S) float32 energy of the kept state (zeros in blind segments): the
            chosen lane's, or under ``token-softmax`` the sum of the kept positions' energies.
        shaped: (S,) bool.
        counters: forward calls / passes / seconds in teacher and compass.
    """

    times: torch.Tensor
    states: torch.Tensor
    energies: torch.Tensor
    chosen: torch.Tensor
    kept_energies: torch.Tensor
    shaped: torch.Tensor
    counters: Counters


def select(
    energies: torch.Tensor, cfg: NavigatorConfig, rng: CounterRNG, segment: int
) -> torch.Tensor:
    """Index of the kept candidate per row: argmin, or a softmax(−e/T) draw keyed by the
    trajectory's SELECT stream (float64 inverse CDF). energies: (B, K) → (B,) int64."""
    if cfg.selection == "argmin":
        return energies.argmin(dim=1)
    logits = -energies.double() / cfg.temperature
    p = torch.softmax(logits, dim=1)
    u = rng.uniform(segment, Stream.SELECT, 1)[:, 0]
    return categorical(p.cumsum(1), u)


def select_tokens(
    candidates: torch.Tensor,
    token_energies: torch.Tensor,
    cfg: NavigatorConfig,
    rng: CounterRNG,
    segment: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position selection (``token-softmax``): position i of row b takes its token from lane
    j with probability ∝ exp(−e[b, j, i] / T), one float64 inverse-CDF draw per position from
    the trajectory's SELECT stream. With a per-token density-ratio energy at T = 1 this is
    importance resampling of each position separately: the kept state's per-position
    marginals are what a factorised student can learn.

    Args:
        candidates: (B, K, L) int64 candidate states (they reveal the same positions).
        token_energies: (B, K, L) per-position energies.

    Returns:
        (B, L) kept state; (B,) the lane that gave most of the positions where the lanes
        differ (0 where they never do); (B,) float32 energy of the kept state (the sum of its
        positions' energies).
    """
    K, L = candidates.shape[1:]
    p = torch.softmax(-token_energies.double() / cfg.temperature, dim=1)  # over lanes
    u = rng.uniform(segment, Stream.SELECT, L)  # (B, L)
    j = categorical(p.transpose(1, 2).cumsum(-1), u)  # (B, L)
    x = candidates.gather(1, j.unsqueeze(1)).squeeze(1)
    kept = token_energies.gather(1, j.unsqueeze(1)).squeeze(1).sum(dim=1)
    varies = (candidates != candidates[:, :1]).any(dim=1)  # (B, L)
    counts = (torch.nn.functional.one_hot(j, K) * varies.unsqueeze(-1)).sum(dim=1)
    return x, counts.argmax(dim=1), kept


def lane_rng(seeds: torch.Tensor, candidates: int, shared_reveals: bool = False) -> CounterRNG:
    """Randomness of the K candidate lanes of B trajectories, in the navigator's layout.

    Row b·K + j is lane j of trajectory b (seed ``seeds[b]``); lane 0 draws exactly what the
    blind trajectory draws. ``shared_reveals``: every lane takes lane 0's JUMP stream, so the
    same positions move in all K candidates.

    Args:
        seeds: (B,) int64 trajectory seeds.
        candidates: K.
        shared_reveals: share the reveal randomness (``NavigatorConfig.shared_reveals``).
    """
    K = candidates
    lanes = torch.arange(K, device=seeds.device).repeat(len(seeds))
    shared = (Stream.JUMP,) if shared_reveals else ()
    return CounterRNG(seeds.repeat_interleave(K), lanes, shared)


@dataclass
class SegmentChoice:
    """One shaped segment of a batch: the kept candidate of each trajectory.

    Attributes:
        x: (B, L) int64 kept states at t_{k+1}.
        cache: the teacher's denoiser cache of the kept rows, for the next segment (None when
            the kept state mixes lanes, ``token-softmax``).
        energies: (B, K) float32 energies of all candidates.
        chosen: (B,) int64 kept lane j* (``token-softmax``: the lane of most positions).
        kept: (B,) float32 energy of the kept state.
    """

    x: torch.Tensor
    cache: DenoiserCache | None
    energies: torch.Tensor
    chosen: torch.Tensor
    kept: torch.Tensor


@torch.no_grad()
def search_segment(
    teacher: Denoiser,
    scorer: Scorer,
    path: MixturePath,
    x: torch.Tensor,
    times: torch.Tensor,
    segment: int,
    step_offset: int,
    cfg: NavigatorConfig,
    rng: CounterRNG,
    lanes: CounterRNG,
    cache: DenoiserCache | None = None,
    counters: Counters | None = None,
) -> SegmentChoice:
    """The search step of one segment [t_k, t_{k+1}] (see the module docstring):

        X_j = rollout of x in lane j,  e_j = E(X_j, t_{k+1}),  j* = select(e),  x ← X_{j*}

    All B·K candidates are one batch (row b·K + j, :func:`lane_rng`); a trajectory's result
    does not depend on its batch-mates.

    Args:
        teacher: denoiser p(x_1 | x_t) (already tempered, if at all).
        scorer: energy model (``tsdfm.models.scorer.Scorer``); given ``log_q`` when it
            ``uses_proposal``.
        path: the teacher's mixture path.
        x: (B, L) int64 states at t_k = times[0].
        times: (n+1,) float64 teacher sub-step grid of the segment.
        segment: k, which keys the SELECT stream of softmax selection.
        step_offset: global index of the segment's first teacher step.
        cfg: candidates K, selection rule and temperature, reveal order.
        rng: (B rows) randomness of the trajectories (selection draws).
        lanes: (B·K rows) randomness of the candidates, :func:`lane_rng`.
        cache: the teacher's denoiser cache of the B rows at t_k.
        counters: accumulates teacher and scorer work.
    """
    B, K, device = x.shape[0], cfg.candidates, x.device
    counters = counters if counters is not None else Counters()
    for key in ("compass_calls", "compass_rows", "compass_seconds", "candidates"):
        counters.extra.setdefault(key, 0)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    # the K lanes start from the parent's cache only where it can be read: a time-invariant
    # teacher with rows still valid (else every lane is evaluated anyway, and copying K times
    # the parent's B × L × V logits would be work and memory for nothing)
    reusable = cache is not None and cache.logits is not None and teacher.time_invariant
    cache_k = cache.select(rows) if reusable and bool(cache.valid.any()) else None
    log_q = (
        torch.zeros(B * K, dtype=torch.float64, device=device) if uses_proposal(scorer) else None
    )
    xk, cache_k = rollout(
        teacher, path, x[rows], times, lanes, step_offset, cache_k, counters, cfg.plan(), log_q
    )
    counters.extra["candidates"] += B * K
    if cfg.selection == "token-softmax":
        if not per_position(scorer):
            raise ConfigError(
                f"selection token-softmax needs per-position energies, which the scorer "
                f"{getattr(scorer, 'name', type(scorer).__name__)!r} does not have; use a "
                "token-ratio compass (compass train --head tokens) or selection softmax"
            )
        te = _score(scorer, xk, float(times[-1]), counters, tokens=True).view(B, K, -1)
        x_kept, j, kept = select_tokens(xk.view(B, K, -1), te, cfg, rng, segment)
        # the kept state mixes lanes: no lane's cache describes it (the next segment
        # evaluates the teacher afresh)
        return SegmentChoice(x_kept, None, te.sum(dim=2), j, kept)
    e = _score(scorer, xk, float(times[-1]), counters, log_q).view(B, K)
    j = select(e, cfg, rng, segment)
    pick = torch.arange(B, device=device) * K + j
    return SegmentChoice(xk[pick], cache_k.select(pick), e, j, e.gather(1, j[:, None])[:, 0])


@torch.no_grad()
def navigate(
    teacher: Denoiser,
    scorer: Scorer | None,
    path: MixturePath,
    seeds: torch.Tensor,
    seq_len: int,
    cfg: NavigatorConfig,
) -> NavigationResult:
    """Run energy-guided midpoint search for a batch of trajectories (see module docstring).

    Args:
        teacher: denoiser p(x_1 | x_t).
        scorer: energy model; may be None only when no segment is shaped.
        path: mixture path of the teacher.
        seeds: (B,) int64 trajectory seeds.
        seq_len: L.
        cfg: S, N, K, τ, selection.
    """
    teacher = tempered(teacher, cfg.teacher_temperature)  # itself at T = 1, else logits / T
    shaped = cfg.shaped_segments()
    if any(shaped) and scorer is None:
        raise ConfigError("shaping with K > 1 needs a compass; pass --compass or use K=1")
    S, K, n = cfg.student_steps, cfg.candidates, cfg.substeps
    B, device = len(seeds), seeds.device
    rng = CounterRNG(seeds)
    lanes = lane_rng(seeds, K, cfg.shared_reveals)
    plan = cfg.plan()
    grid = uniform_grid(cfg.teacher_steps, device)
    x = path.sample_source((B, seq_len), rng)
    states = [x]
    energies = torch.zeros(B, S, K, dtype=torch.float32, device=device)
    chosen = torch.zeros(B, S, dtype=torch.long, device=device)
    kept = torch.zeros(B, S, dtype=torch.float32, device=device)
    counters = Counters(
        extra={"compass_calls": 0, "compass_rows": 0, "compass_seconds": 0.0, "candidates": 0}
    )
    if cfg.selection == "tilt" and any(shaped) and not hasattr(scorer, "log_ratios"):
        raise ConfigError(
            "selection tilt needs a scorer with per-token log-ratios (log_ratios): the "
            "token-ratio compass, compass train --head tokens"
        )
    cache = None
    for k in range(S):
        seg = grid[k * n : (k + 1) * n + 1]
        if shaped[k] and cfg.selection == "tilt":
            x = tilt_segment(teacher, scorer, path, x, seg, rng, k * n, counters, plan)
            kept[:, k] = _score(scorer, x, float(seg[-1]), counters, tokens=True).sum(-1)
            energies[:, k, 0] = kept[:, k]
            cache = None  # the tilted logits are not the teacher's
        elif shaped[k]:
            choice = search_segment(
                teacher, scorer, path, x, seg, k, k * n, cfg, rng, lanes, cache, counters
            )
            x, cache = choice.x, choice.cache
            energies[:, k] = choice.energies
            chosen[:, k] = choice.chosen
            kept[:, k] = choice.kept
        else:
            x, cache = rollout(teacher, path, x, seg, rng, k * n, cache, counters, plan)
        states.append(x)
    return NavigationResult(
        times=grid[::n].clone(),
        states=torch.stack(states, dim=1),
        energies=energies,
        chosen=chosen,
        kept_energies=kept,
        shaped=torch.tensor(shaped, dtype=torch.bool),
        counters=counters,
    )


class TiltedDenoiser:
    """The teacher tilted by a token-ratio scorer: logits log q(· | x_t) + r(x_t)[i, ·]
    (``selection="tilt"``). Counts the scorer's passes in ``counters``."""

    time_invariant = False

    def __init__(self, teacher: Denoiser, scorer, counters: Counters):
        self.teacher, self.scorer, self.counters = teacher, scorer, counters

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        logits = self.teacher(x_t, t, h)
        start = time.perf_counter()
        r = self.scorer.log_ratios(x_t, t.double())
        _charge(self.counters, start, x_t.shape[0])
        if not torch.isfinite(r).all():
            raise FloatingPointError("the compass returned non-finite log-ratios")
        return torch.log_softmax(logits.float(), -1) + r.to(logits.device)


def tilt_segment(
    teacher: Denoiser,
    scorer,
    path: MixturePath,
    x: torch.Tensor,
    seg: torch.Tensor,
    rng: CounterRNG,
    step_offset: int,
    counters: Counters,
    plan: RevealPlan,
) -> torch.Tensor:
    """One shaped segment under ``selection="tilt"``: lane 0's randomness (so positions and
    uniforms are the blind trajectory's), the teacher's logits tilted by the scorer."""
    tilted = TiltedDenoiser(teacher, scorer, counters)
    x, _ = rollout(tilted, path, x, seg, rng, step_offset, None, counters, plan)
    return x


def _score(
    scorer: Scorer,
    x: torch.Tensor,
    t: float,
    counters: Counters,
    log_q: torch.Tensor | None = None,
    tokens: bool = False,
) -> torch.Tensor:
    start = time.perf_counter()
    if tokens:
        e = scorer.token_energies(x, t).float()
    elif log_q is None:
        e = scorer.energy(x, t).float()
    else:
        e = scorer.energy(x, t, log_q=log_q).float()
    synchronize(e.device)
    _charge(counters, start, x.shape[0])
    if not torch.isfinite(e).all():
        raise FloatingPointError("the compass returned non-finite energies")
    return e


def _charge(counters: Counters, start: float, rows: int) -> None:
    """Count one compass pass over ``rows`` states, begun at ``start`` (perf_counter)."""
    counters.extra["compass_seconds"] += time.perf_counter() - start
    counters.extra["compass_calls"] += 1
    counters.extra["compass_rows"] += rows
